"""Reading users' YAML: plain values with the line of every key and item, and the refusals that keep a
mistaken or hostile file from costing more than a moment — each naming the file and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarmlearn.errors import ConfigError
from swarmlearn.yamlfile import MAX_DEPTH, MAX_NODES, MAX_YAML_BYTES, dump_yaml, load_yaml

PLAIN = (dict, list, str, int, float, bool, type(None))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "file.yaml"
    path.write_text(text)
    return path


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as refused:
        load_yaml(path)
    return str(refused.value)


def assert_plain(value) -> None:
    assert type(value) in PLAIN, f"{value!r} is a {type(value).__name__}"
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else []:
        assert_plain(item)
    for key in value if isinstance(value, dict) else []:
        assert_plain(key)


def billion_laughs(levels: int) -> str:
    """9**levels values in a few lines: each level lists the one before it nine times."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# What callers get


def test_values_are_plain_python_and_every_key_and_item_has_its_line(tmp_path):
    path = write(tmp_path, """\
# a banner
base: &base
  image: python
  tags: [a, &t b]
run:
  <<: *base
  image: "py 3"
  steps:
    - one
    - |
      two lines
      of text
  count: &n 3
  again: *n
  ratio: 0.5
  on_error: ~
  enabled: true
  other: *t
""")
    data, lines = load_yaml(path)

    assert data["run"] == {"image": "py 3", "steps": ["one", "two lines\nof text\n"], "count": 3, "again": 3,
                           "ratio": 0.5, "on_error": None, "enabled": True, "other": "b", "tags": ["a", "b"]}
    assert_plain(data)
    assert lines.line_of(()) == 2  # the document starts after the banner
    assert [lines.line_of(("run", key)) for key in ("image", "steps", "count", "other")] == [7, 8, 13, 18]
    assert lines.line_of(("run", "steps", 1)) == 10
    assert lines.line_of(("run", "tags")) == 4  # merged from the anchor: where it is written
    assert lines.line_of(("run", "tags", 1)) == 4
    assert lines.line_of(("run", "missing", 0)) == 5  # a key that is not there: the mapping that lacks it


def test_an_aliased_value_is_copied_so_callers_may_change_one_use(tmp_path):
    data, _ = load_yaml(write(tmp_path, "a: &list [1, 2]\nb: *list\n"))

    data["b"].append(3)
    assert data == {"a": [1, 2], "b": [1, 2, 3]}


def test_yaml_1_2_yes_and_on_are_text_and_leading_zeros_are_decimal(tmp_path):
    data, _ = load_yaml(write(tmp_path, "a: yes\nb: on\nc: No\nd: 0755\ne: 0x1F\nf: 1:30\ng: True\n"))

    assert data == {"a": "yes", "b": "on", "c": "No", "d": 755, "e": 31, "f": "1:30", "g": True}


def test_dump_yaml_writes_what_load_yaml_reads_back(tmp_path):
    data = {"Name": "run", "Body": {"Envvars": [{"A": "yes"}, {"B": "0755"}, {"C": 1}], "Empty": None,
                                    "Text": "a: b", "Flags": [True, 0.5, ""]}}

    text = dump_yaml(data)

    assert load_yaml(write(tmp_path, text))[0] == data
    assert text.startswith("Name: run\nBody:\n  Envvars:\n  - A: yes\n")  # block style, keys in order


# --------------------------------------------------------------------------------------------------
# Mistakes


def test_a_duplicate_key_names_the_file_its_key_path_and_both_lines(tmp_path):
    path = write(tmp_path, "Name: a\nBody:\n  Command: x.py\n  Envvars: ~\n  Command: y.py\n")

    assert refusal(path) == f"{path}:5: Body.Command: this key is written twice in one mapping (first on line 3); " \
                            f"keep one"


def test_a_key_merged_from_an_anchor_may_be_written_again(tmp_path):
    data, _ = load_yaml(write(tmp_path, "base: &b {x: 1, y: 2}\nover:\n  <<: *b\n  x: 3\n"))

    assert data["over"] == {"x": 3, "y": 2}


@pytest.mark.parametrize("text, says", [
    ("Name: !!python/object/apply:os.system [ls]\n", "1: Name: the tag !!python/object/apply:os.system is not allowed"),
    ("Name: !custom value\n", "1: Name: the tag !custom is not allowed"),
    ("Steps: !!set {a, b}\n", "1: Steps: the tag !!set is not allowed"),
    ("a: 1\nBlob: !!binary aGVsbG8=\n", "2: Blob: the tag !!binary is not allowed"),
    ("? [a, b]\n: 1\n", "1: the document: a key must be text or a number"),
])
def test_tags_and_keys_that_are_not_plain_yaml_are_refused_at_their_line(tmp_path, text, says):
    path = write(tmp_path, text)

    assert refusal(path).startswith(f"{path}:{says}")


# --------------------------------------------------------------------------------------------------
# Hostile files: each refused by a budget before it costs time or memory. A test that did expand
# them would not finish; none of them times anything.


def test_an_alias_bomb_is_refused_by_its_value_budget_at_the_line_that_passes_it(tmp_path):
    path = write(tmp_path, billion_laughs(40) + "Body: *l39\n")  # 9**40 values; line 6 alone holds 9**6

    assert refusal(path) == (f"{path}:6: holds more than {MAX_NODES} values once its *aliases are expanded; write "
                             f"the repeated parts out or use fewer *aliases")


def test_a_key_written_twice_with_a_big_aliased_value_is_reported_without_printing_the_value(tmp_path):
    path = write(tmp_path, billion_laughs(4) + "x: *l3\nx: *l3\n")  # 7381 values each, within the budget

    assert refusal(path) == f"{path}:6: x: this key is written twice in one mapping (first on line 5); keep one"


def merge_bomb(keys: int, merges: int) -> str:
    """A map of `keys` keys, merged `merges` times into one: ruamel copies every key for every `*a`."""
    lines = ["a: &a"] + [f"  k{i}: {i}" for i in range(keys)]
    return "\n".join(lines) + "\nb:\n  <<: [" + ", ".join(["*a"] * merges) + "]\n"


@pytest.mark.timeout(30)
def test_a_merge_key_bomb_is_refused_by_the_value_budget_before_ruamel_merges_it(tmp_path):
    """55 KB that took ruamel seconds to merge, and a 1 MiB one hours; the merged map ends with only
    4000 keys, so only counting every merged map in full refuses it."""
    path = write(tmp_path, merge_bomb(4000, 4000))

    assert refusal(path) == (f"{path}:4003: holds more than {MAX_NODES} values once its *aliases are expanded; "
                             f"write the repeated parts out or use fewer *aliases")


def test_merged_maps_count_in_full_and_within_the_budget_are_merged(tmp_path):
    data, lines = load_yaml(write(tmp_path, merge_bomb(100, 900)))  # 90,000 values merged

    assert data["b"] == data["a"] == {f"k{i}": i for i in range(100)}
    assert lines.line_of(("b", "k99")) == 101


def test_a_chain_of_merges_nests_no_deeper_and_keys_keep_the_line_they_are_written_on(tmp_path):
    text = "m0: &m0 {k0: 0}\n" + "".join(f"m{i}: &m{i} {{<<: [*m{i - 1}], k{i}: {i}}}\n" for i in range(1, 200))
    data, lines = load_yaml(write(tmp_path, text))

    assert data["m199"] == {f"k{i}": i for i in range(200)}
    assert [lines.line_of(("m199", f"k{i}")) for i in (0, 1, 199)] == [1, 2, 200]


@pytest.mark.parametrize("text", [
    "Body: &b [*b]\n",
    "&b [*b]\n",
    "a: &a {x: *a}\n",
    "a: &a {<<: *a}\n",
])
def test_an_alias_inside_the_value_it_names_is_refused(tmp_path, text):
    path = write(tmp_path, text)

    message = refusal(path)
    assert message.startswith(f"{path}:1"), message
    assert "an *alias inside the value it names would repeat forever" in message


@pytest.mark.parametrize("opening, closing", [("[", "]"), ("{a: ", "}"), ("- ", "")])
def test_nesting_deeper_than_the_limit_is_refused_where_it_goes_too_deep(tmp_path, opening, closing):
    """Up to the size cap: a file of brackets only, or of ever deeper indentation. The document's own
    mapping and the innermost value count as levels too."""
    if opening == "- ":
        deep, fine = ("".join(" " * i + "- \n" for i in range(n)) for n in (1400, MAX_DEPTH - 1))
    else:
        deep, fine = (f"a: {opening * n}1{closing * n}\n"[:MAX_YAML_BYTES] for n in (250_000, MAX_DEPTH - 2))

    load_yaml(write(tmp_path, fine))
    path = write(tmp_path, deep)
    message = refusal(path)
    assert message.startswith(f"{path}:"), message
    assert f"nested more than {MAX_DEPTH} levels deep; flatten the brackets or indentation" in message


def nested_aliases(levels: int, brackets: int) -> str:
    """`levels` lists of `brackets` brackets, each holding the one before it by *alias: few lines, and
    levels * brackets deep once the aliases are expanded."""
    lines = [f"l0: &l0 {'[' * brackets}1{']' * brackets}"]
    lines += [f"l{i}: &l{i} {'[' * brackets}*l{i - 1}{']' * brackets}" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, line", [
    (nested_aliases(57, 60), 2),  # over 3000 levels: beyond Python's recursion limit
    ("d: &d " + "[" * 61 + "1" + "]" * 61 + "\ne: [[*d]]\n", 2),  # one level too many
    ("s0: &s0 {x: 1}\n" + "".join(f"s{i}: &s{i} {{x: *s{i - 1}}}\n" for i in range(1, 70)), 63),  # s62: 65 levels
])
def test_aliases_nested_inside_one_another_past_the_depth_limit_are_refused_at_the_alias(tmp_path, text, line):
    path = write(tmp_path, text)

    assert refusal(path) == (f"{path}:{line}: nested more than {MAX_DEPTH} levels deep once its *aliases are "
                             f"expanded; use fewer *aliases inside one another, or flatten the values they name")


def test_an_alias_may_nest_its_value_up_to_the_depth_limit(tmp_path):
    data, _ = load_yaml(write(tmp_path, "d: &d " + "[" * 61 + "1" + "]" * 61 + "\ne: [*d]\n"))

    assert data["e"] == [data["d"]]


def test_a_file_over_the_size_cap_is_refused_unread(tmp_path):
    path = write(tmp_path, "a: " + "x" * MAX_YAML_BYTES + "\n")

    assert refusal(path).startswith(f"{path}: {MAX_YAML_BYTES + 4} bytes, more than the 1 MiB a swarmlearn YAML file "
                                    f"may have")
