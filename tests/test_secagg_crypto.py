"""Secure aggregation's cryptography, in one process: five nodes mask their updates, the leader adds the
masked inputs and learns exactly the sum of the survivors' updates, and nothing else along the way.

Every peer's text is attacked here as the leader or a participant could: tampered, replayed into
another round, revealed twice, or wrong.
"""

from __future__ import annotations

import base64
import time
import tracemalloc

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from swarmlearn import secagg
from swarmlearn.secagg import (RANGE, SCALE_BITS, RoundSecrets, SecAggError, context, decode_fixed, encode_fixed,
                               masked_input, open_shares, reveal, seal_shares, threshold, unmask)

NODES = ["ada", "bob", "cyd", "dee", "eve"]
CTX = context("flagship", 2, 3)


class SecureRound:
    """One round as the ledger would carry it: keys published, shares sealed and opened, inputs masked."""

    def __init__(self, nodes: list[str], ctx: bytes = CTX):
        self.nodes = nodes
        self.ctx = ctx
        self.secrets = {n: RoundSecrets.fresh() for n in nodes}
        self.publics = {n: s.public() for n, s in self.secrets.items()}
        self.sealed = {n: seal_shares(self.secrets[n], n, nodes, self.publics, ctx) for n in nodes}
        self.held = {n: open_shares(self.secrets[n], n, nodes, self.publics, self.sealed_for(n), ctx) for n in nodes}

    def sealed_for(self, recipient: str) -> dict[str, str]:
        return {sender: by_recipient[recipient] for sender, by_recipient in self.sealed.items()}

    def mask(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: masked_input(x, self.secrets[n], n, self.nodes, self.publics, self.ctx) for n, x in inputs.items()}

    def reveals(self, survivors: list[str], dropped: list[str]) -> dict[str, dict[str, str]]:
        return {u: reveal(self.held[u], u, survivors, dropped) for u in survivors}

    def unmask(self, masked: dict[str, np.ndarray], survivors: list[str], revealed=None) -> np.ndarray:
        dropped = [n for n in self.nodes if n not in survivors]
        revealed = self.reveals(survivors, dropped) if revealed is None else revealed
        total = np.zeros_like(masked[survivors[0]])
        for u in survivors:
            total += masked[u]
        return unmask(total, revealed, self.nodes, survivors, dropped, self.publics, self.ctx)


def updates(count: int, size: int, seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(0.0, 10.0 ** rng.integers(-3, 3), size) for n in NODES[:count]}


def plain_sum(encoded: dict[str, np.ndarray], nodes: list[str]) -> np.ndarray:
    total = np.zeros_like(encoded[nodes[0]])
    for n in nodes:
        total += encoded[n]
    return total


def flip_byte(text: str, at: int) -> str:
    data = bytearray(base64.b64decode(text))
    data[at] ^= 0x01
    return base64.b64encode(bytes(data)).decode()


def chi_square_of_bytes(values: np.ndarray) -> float:
    counts = np.bincount(values.view(np.uint8), minlength=256)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_five_nodes_the_leader_learns_exactly_the_sum():
    floats = updates(5, 10_001)
    encoded = {n: encode_fixed(x) for n, x in floats.items()}
    r = SecureRound(NODES)
    result = r.unmask(r.mask(encoded), NODES)

    assert result.dtype == np.uint64
    assert np.array_equal(result, plain_sum(encoded, NODES))
    for n in NODES:  # one node's rounding: half a step
        assert np.max(np.abs(decode_fixed(encoded[n]) - floats[n])) <= 2.0 ** -(SCALE_BITS + 1)
    reference = np.sum([floats[n] for n in NODES], axis=0)
    assert np.max(np.abs(decode_fixed(result) - reference)) <= len(NODES) * 2.0 ** -(SCALE_BITS + 1) + 1e-11


def test_a_masked_input_looks_uniform_while_the_update_does_not():
    x = encode_fixed(updates(1, 1 << 18)["ada"])
    r = SecureRound(NODES)
    y = r.mask({"ada": x})["ada"]

    # 255 degrees of freedom: mean 255, standard deviation 22.6; 400 is 6.4 of them (p ~ 1e-9).
    assert chi_square_of_bytes(x) > 10_000
    assert chi_square_of_bytes(y) < 400
    assert np.count_nonzero(y == x) < 10
    bits = np.unpackbits(y.view(np.uint8)).reshape(-1, 64).mean(axis=0)
    assert np.all(np.abs(bits - 0.5) < 6 * 0.5 / np.sqrt(y.size))


@pytest.mark.parametrize("gone", [["cyd"], ["ada", "eve"]])
def test_nodes_that_drop_after_masking_are_recovered(gone):
    encoded = {n: encode_fixed(x) for n, x in updates(5, 4097, seed=11).items()}
    r = SecureRound(NODES)
    masked = r.mask(encoded)  # every node masked with all five; the leader never gets `gone`'s inputs
    survivors = [n for n in NODES if n not in gone]

    assert np.array_equal(r.unmask(masked, survivors), plain_sum(encoded, survivors))


def test_below_the_threshold_the_round_cannot_be_unmasked_and_says_who_lacks_shares():
    encoded = {n: encode_fixed(x) for n, x in updates(5, 64).items()}
    r = SecureRound(NODES)
    masked = r.mask(encoded)
    survivors, dropped = ["bob", "cyd", "dee"], ["ada", "eve"]
    revealed = r.reveals(survivors, dropped)
    del revealed["dee"]["eve"]  # the leader lost one share of eve's mask key: 2 left, 3 needed
    assert threshold(5) == 3

    with pytest.raises(SecAggError, match=r"too few shares revealed for eve \(2 of 3 needed\)") as caught:
        r.unmask(masked, survivors, revealed)
    assert caught.value.nodes == ("eve",)

    del revealed["dee"]  # a survivor's reveal never came: every node is short
    with pytest.raises(SecAggError, match=r"ada \(2 of 3 needed\), bob \(2 of 3 needed\)"):
        r.unmask(masked, survivors, revealed)


def test_a_tampered_sealed_share_is_refused_naming_its_sender():
    r = SecureRound(NODES)
    sealed = r.sealed_for("cyd")
    sealed["bob"] = flip_byte(sealed["bob"], 40)
    sealed["eve"] = sealed["eve"][:-4] + "####"

    with pytest.raises(SecAggError, match="the share bob sealed for cyd does not open") as caught:
        open_shares(r.secrets["cyd"], "cyd", NODES, r.publics, sealed, CTX)
    assert caught.value.nodes == ("bob", "eve")
    assert "the share eve sealed for cyd is not base64" in str(caught.value)


def test_a_share_sealed_for_one_node_does_not_open_for_another():
    r = SecureRound(NODES)
    sealed = r.sealed_for("cyd")
    sealed["bob"] = r.sealed["bob"]["dee"]
    with pytest.raises(SecAggError, match="the share bob sealed for cyd does not open"):
        open_shares(r.secrets["cyd"], "cyd", NODES, r.publics, sealed, CTX)

    sealed = r.sealed_for("cyd")
    sealed["bob"] = r.sealed["cyd"]["bob"]  # reflected: cyd's own share for bob, under the key they share
    with pytest.raises(SecAggError, match="the share bob sealed for cyd does not open"):
        open_shares(r.secrets["cyd"], "cyd", NODES, r.publics, sealed, CTX)


def test_a_share_sealed_under_another_participant_list_is_refused():
    r = SecureRound(NODES)
    others = ["abe", *NODES]  # bob counts one more participant: cyd's x-coordinate moves from 3 to 4
    publics = {**r.publics, "abe": RoundSecrets.fresh().public()}
    sealed = r.sealed_for("cyd")
    sealed["bob"] = seal_shares(r.secrets["bob"], "bob", others, publics, CTX)["cyd"]

    with pytest.raises(SecAggError, match="the share bob sealed for cyd is malformed .*x 4 where cyd is 3") as caught:
        open_shares(r.secrets["cyd"], "cyd", NODES, r.publics, sealed, CTX)
    assert caught.value.nodes == ("bob",)


def test_a_share_sealed_for_round_3_does_not_open_in_round_4():
    r = SecureRound(NODES, context("flagship", 2, 3))
    assert context("flagship", 2, 4) != context("flagship", 2, 3) != context("flagship", 3, 3)
    assert context("flagship", 2, 3) != context("flagshi", 2, 3)

    with pytest.raises(SecAggError, match="the share ada sealed for bob does not open") as caught:
        open_shares(r.secrets["bob"], "bob", NODES, r.publics, {"ada": r.sealed["ada"]["bob"]},
                    context("flagship", 2, 4))
    assert caught.value.nodes == ("ada",)


def test_sealed_and_revealed_texts_are_small():
    r = SecureRound(NODES)
    assert all(len(text) < 400 for by_recipient in r.sealed.values() for text in by_recipient.values())
    assert set(r.sealed["ada"]) == set(NODES)  # itself too: it reveals its own share of b as a survivor
    assert all(len(text) < 100 for text in r.reveals(NODES, [])["ada"].values())


def test_no_node_reveals_both_secrets_of_one_node():
    r = SecureRound(NODES)
    with pytest.raises(SecAggError, match="both secrets of cyd") as caught:
        reveal(r.held["ada"], "ada", ["ada", "bob", "cyd"], ["cyd", "dee", "eve"])
    assert caught.value.nodes == ("cyd",)
    with pytest.raises(SecAggError, match="not named a survivor"):
        reveal(r.held["ada"], "ada", ["bob", "cyd", "dee"], ["ada", "eve"])

    # A leader that asks again with other lists gets nothing more: ada revealed cyd's b already.
    first = reveal(r.held["ada"], "ada", ["ada", "bob", "cyd", "dee"], ["eve"])
    with pytest.raises(SecAggError, match="already revealed the other secret of cyd"):
        reveal(r.held["ada"], "ada", ["ada", "bob", "dee"], ["cyd", "eve"])
    assert reveal(r.held["ada"], "ada", ["ada", "bob", "cyd", "dee"], ["eve"]).keys() == first.keys()


def wrong_share(text: str) -> str:
    kind, value = text.split(":")
    number = (int.from_bytes(base64.b64decode(value), "big") + 1) % secagg.PRIME
    return f"{kind}:{base64.b64encode(number.to_bytes(66, 'big')).decode()}"


def test_a_wrong_revealed_share_fails_the_check_and_with_spare_shares_its_revealer_is_named():
    encoded = {n: encode_fixed(x) for n, x in updates(5, 64).items()}
    r = SecureRound(NODES)
    masked = r.mask(encoded)

    exact = ["bob", "cyd", "dee"]  # three shares each, three needed: a wrong one is caught, not placed
    revealed = r.reveals(exact, ["ada", "eve"])
    revealed["cyd"]["dee"] = wrong_share(revealed["cyd"]["dee"])
    with pytest.raises(SecAggError, match="self-mask seed of dee rebuilt from the shares of bob, cyd, dee fails its "
                                          "commitment check") as caught:
        r.unmask(masked, exact, revealed)
    assert caught.value.nodes == ("bob", "cyd", "dee")

    r = SecureRound(NODES)  # a fresh round: in this one each node already revealed one secret of the others
    masked = r.mask(encoded)
    survivors = ["ada", "bob", "cyd", "dee"]  # four shares each: the wrong one is found
    revealed = r.reveals(survivors, ["eve"])
    revealed["bob"]["eve"] = wrong_share(revealed["bob"]["eve"])
    with pytest.raises(SecAggError, match="the share bob revealed of the mask key of eve is wrong") as caught:
        r.unmask(masked, survivors, revealed)
    assert caught.value.nodes == ("bob",)


def test_a_reveal_of_the_wrong_kind_or_by_a_non_survivor_is_refused():
    r = SecureRound(NODES)
    masked = r.mask({n: encode_fixed(x) for n, x in updates(5, 8).items()})
    survivors = ["ada", "bob", "cyd", "dee"]
    revealed = r.reveals(survivors, ["eve"])
    revealed["ada"]["eve"] = "b:" + revealed["ada"]["eve"][2:]
    with pytest.raises(SecAggError, match="ada revealed the self-mask seed of eve, which is dropped"):
        r.unmask(masked, survivors, revealed)

    revealed = r.reveals(survivors, ["eve"])
    revealed["eve"] = dict(revealed["ada"])
    with pytest.raises(SecAggError, match="eve revealed shares but is not a survivor"):
        r.unmask(masked, survivors, revealed)

    revealed = r.reveals(survivors, ["eve"])
    revealed["ada"]["bob"] = "b:" + base64.b64encode(b"\xff" * 66).decode()
    with pytest.raises(SecAggError, match="the share ada revealed of bob lies beyond the field"):
        r.unmask(masked, survivors, revealed)


def test_malformed_public_keys_are_refused_naming_their_node():
    r = SecureRound(NODES)
    for bad in ({"c": "AAAA"}, {"s": "!" * 44}, {"b": "F" * 64}, {"c": base64.b64encode(bytes(32)).decode()}):
        publics = dict(r.publics)
        publics["dee"] = {**publics["dee"], **bad}
        with pytest.raises(SecAggError) as caught:
            seal_shares(r.secrets["ada"], "ada", NODES, publics, CTX)
        assert caught.value.nodes == ("dee",)
    with pytest.raises(SecAggError, match="not those of its round secrets"):
        seal_shares(RoundSecrets.fresh(), "ada", NODES, r.publics, CTX)
    with pytest.raises(SecAggError, match="at least 3"):
        seal_shares(r.secrets["ada"], "ada", ["ada", "bob"], r.publics, CTX)


def test_encode_fixed_takes_finite_values_inside_the_range_only():
    edge = np.nextafter(RANGE, 0.0)
    values = np.array([0.0, -1.5, 2.0 ** -SCALE_BITS, edge, -edge, 123.456])
    rounded = round(123.456 * 2 ** SCALE_BITS) / 2 ** SCALE_BITS
    assert np.array_equal(decode_fixed(encode_fixed(values)), [*values[:5], rounded])
    assert encode_fixed(np.array([-1.0]))[0] == 2 ** 64 - 2 ** 32  # two's complement
    assert encode_fixed(np.ones((2, 3), dtype=np.float32)).shape == (2, 3)

    with pytest.raises(SecAggError, match="value 2 is nan"):
        encode_fixed(np.array([0.0, 1.0, np.nan]))
    with pytest.raises(SecAggError, match="value 1 is -inf"):
        encode_fixed(np.array([0.0, -np.inf]))
    with pytest.raises(SecAggError, match=r"value 3 is -2097152.0: .*\|value\| < 2097152 \(this one is 1 times"):
        encode_fixed(np.array([0.0, 1.0, 2.0, -RANGE]))
    with pytest.raises(SecAggError, match=r"value 0 is 3000000.0: .*\(this one is 1.43 times that\)"):
        encode_fixed(np.array([3e6]))
    with pytest.raises(SecAggError, match="floating-point"):
        encode_fixed(np.array([1, 2, 3]))

    # The most any 1024 nodes may add stays inside int64.
    most = encode_fixed(np.array([edge, -edge])).view(np.int64).astype(object) * secagg.MAX_PARTICIPANTS
    assert -2 ** 63 <= most[1] and most[0] < 2 ** 63


def aes_ctr_keystream(seed: bytes, count: int) -> np.ndarray:
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(8 * count))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1 << 16])
def test_masks_are_the_same_whatever_the_chunk_size(monkeypatch, chunk):
    r = SecureRound(NODES)
    x = encode_fixed(updates(1, 3001)["ada"])
    expected = r.mask({"ada": x})["ada"]
    alone = masked_input(x, r.secrets["ada"], "ada", ["ada"], r.publics, CTX)  # the self-mask only

    monkeypatch.setattr(secagg, "CHUNK_VALUES", chunk)
    assert np.array_equal(r.mask({"ada": x})["ada"], expected)
    assert np.array_equal(alone - x, aes_ctr_keystream(r.secrets["ada"].self_seed, x.size))
    assert np.array_equal(masked_input(x, r.secrets["ada"], "ada", ["ada"], r.publics, CTX), alone)


def test_masking_a_large_input_needs_about_one_chunk_beyond_its_output():
    r = SecureRound(NODES)
    x = np.zeros(4_000_000, dtype=np.uint64)
    tracemalloc.start()
    try:
        y = masked_input(x, r.secrets["ada"], "ada", NODES, r.publics, CTX)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - y.nbytes < 4 * 8 * secagg.CHUNK_VALUES


def test_unmasking_a_million_values_from_five_nodes_takes_well_under_a_second(record_property):
    size = 1_000_000
    rng = np.random.default_rng(3)
    encoded = {n: encode_fixed(rng.normal(0.0, 0.01, size)) for n in NODES}
    r = SecureRound(NODES)
    masked = r.mask(encoded)
    survivors, dropped = ["ada", "bob", "dee", "eve"], ["cyd"]
    revealed = r.reveals(survivors, dropped)
    total = plain_sum(masked, survivors)

    started = time.perf_counter()
    result = unmask(total, revealed, NODES, survivors, dropped, r.publics, CTX)
    elapsed = time.perf_counter() - started
    record_property("unmask_1M_5_nodes_s", elapsed)
    print(f"unmask of {size} values, 4 survivors and 1 dropped of 5: {elapsed * 1000:.0f} ms")

    assert np.array_equal(result, plain_sum(encoded, survivors))
    assert elapsed < 5.0  # a generous bound on 2 busy cores; about 8 keystreams of 8 MB
