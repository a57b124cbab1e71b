"""The SWCI command language: init scripts as users of the original write them.

One command per line, `#` starts a comment, keywords are case-insensitive (names are not). Each
command is a pattern; a line that matches none is an error naming its line number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from swarmlearn.errors import ConfigError

def _p(template: str) -> re.Pattern:
    """'WAIT FOR IP {ip} {port?}' -> a case-insensitive regex with a named group per field; a field
    marked ? may be left out."""
    regex = ""
    for token in template.split():
        field = re.fullmatch(r"\{(\w+)(\??)\}", token)
        if field is None:
            piece, optional = re.escape(token), False
        else:
            piece, optional = rf"(?P<{field.group(1)}>\S+)", bool(field.group(2))
        regex += rf"(?:\s+{piece})?" if optional else (rf"\s+{piece}" if regex else piece)
    return re.compile(rf"^\s*{regex}\s*$", re.IGNORECASE)


# Lines whose last field is free text (a value, a line of YAML) and so may hold spaces.
_FREE_TEXT = {
    "set_context_env": re.compile(r"^\s*SET\s+CONTEXT\s+ENV\s+(?P<rest>\S.*?)\s*$", re.IGNORECASE),
    # One space separates the index from the line, whose own indentation is kept: it is YAML.
    "append_task_body": re.compile(r"^\s*APPEND\s+TASK\s+BODY\s+(?P<name>\S+)\s+(?P<idx>\S+)(?: (?P<content>.*))?$",
                                   re.IGNORECASE),
}

# (command name, pattern). Order matters where one pattern is a prefix of another.
GRAMMAR: list[tuple[str, re.Pattern]] = [(name, _p(t)) for name, t in [
    ("exit_on_failure", "EXIT ON FAILURE {mode?}"),
    ("exit", "EXIT"),
    ("wait_for_ip", "WAIT FOR IP {ip} {port?} {retries?}"),
    ("wait_for_service", "WAIT FOR SERVICE {service?} {retries?}"),
    ("create_context", "CREATE CONTEXT {name} WITH IP {ip} {port?}"),
    ("create_context_service", "CREATE CONTEXT {name} WITH SERVICE {service}"),
    # The oldest mnist-pyt script's short forms, `wait for 172.1.1.1` and `create context n 172.1.1.1`;
    # after the long forms, and never taking a keyword as the host (see _SHORT_FORMS).
    ("wait_for_ip", "WAIT FOR {ip}"),
    ("create_context", "CREATE CONTEXT {name} {ip}"),
    ("switch_context", "SWITCH CONTEXT {name}"),
    ("list_contexts", "LIST CONTEXTS"),
    ("get_context_info", "GET CONTEXT INFO {name?}"),
    ("get_context_version", "GET CONTEXT VERSION"),
    ("list_context_env", "LIST CONTEXT ENV {name?}"),
    ("get_context_env", "GET CONTEXT ENV {first} {second?}"),
    ("create_contract", "CREATE CONTRACT {name} WITH PEERS {nodes} MERGE {method}"),
    ("create_contract", "CREATE CONTRACT {name} WITH PEERS {nodes}"),
    ("create_contract", "CREATE CONTRACT {name} MERGE {method}"),
    ("create_contract", "CREATE CONTRACT {name}"),
    ("set_contract_merge", "SET CONTRACT {name} MERGE {method}"),
    ("list_contracts", "LIST CONTRACTS"),
    ("get_contract_info", "GET CONTRACT INFO {name}"),
    ("get_contract_info", "GET CONTRACT STATUS {name}"),
    ("reset_contract", "RESET CONTRACT {name}"),
    ("perfdata", "PERFDATA {name}"),
    ("create_task", "CREATE TASK FROM {file}"),
    ("create_task_inline", "CREATE TASK {task_type} {name} {author} {prereq} {outcome}"),
    ("finalize_task", "FINALIZE TASK {name}"),
    ("delete_task", "DELETE TASK {name}"),
    ("list_tasks", "LIST TASKS"),
    ("get_task_info", "GET TASK INFO {name}"),
    ("get_task_body", "GET TASK BODY {name}"),
    ("create_taskrunner", "CREATE TASKRUNNER {name}"),
    ("assign_task_all", "ASSIGN TASK {task} TO {runner} WITH ALL PEERS"),
    ("assign_task", "ASSIGN TASK {task} TO {runner} WITH {peers} PEERS"),
    ("assign_task_target", "ASSIGN TASK {task} TO {runner} TARGET {swop}"),
    ("wait_for_taskrunner", "WAIT FOR TASKRUNNER {runner} {timeout?}"),
    ("get_taskrunner_status", "GET TASKRUNNER STATUS {runner}"),
    ("get_taskrunner_status", "GET TASKRUNNER INFO {runner}"),
    ("get_taskrunner_peer_status", "GET TASKRUNNER PEER STATUS {runner} {peer}"),
    ("get_taskrunner_status", "GET TASKRUNNER PEER STATUS {runner}"),
    ("list_taskrunners", "LIST TASKRUNNERS"),
    ("list_taskrunner_peers", "LIST TASKRUNNER PEERS {runner?}"),
    ("reset_taskrunner", "RESET TASKRUNNER {runner}"),
    ("list_nodes", "LIST NODES"),
    ("sleep", "SLEEP {seconds}"),
    ("cd", "cd {path}"),
    ("pwd", "pwd()"),
    ("ls", "ls()"),
    ("help", "HELP"),
]] + list(_FREE_TEXT.items())

# Words of the long forms that a short form's host may not be: `wait for taskrunner` is a mistake.
_KEYWORDS = {"IP", "SERVICE", "TASKRUNNER", "WITH"}

USAGE = """Commands (keywords case-insensitive; a host may be an IP or a name: DNS, the hosts file, the SN's nodes):
  EXIT ON FAILURE [ON|OFF]   EXIT   WAIT FOR [IP] <host> [port] [retries]   WAIT FOR SERVICE <host[:port]> [retries]
  CREATE CONTEXT <n> [WITH IP] <host>[:port][,<host>[:port]...] [port]   CREATE CONTEXT <n> WITH SERVICE <host[:port]>
  SWITCH CONTEXT <n>   LIST CONTEXTS   GET CONTEXT INFO [<n>]   GET CONTEXT VERSION
  LIST CONTEXT ENV [<n>]   GET CONTEXT ENV [<n>] <env>   SET CONTEXT ENV [<n>] <env> <value>
  CREATE CONTRACT <n> [WITH PEERS a,b] [MERGE <method>]   SET CONTRACT <n> MERGE <method>   LIST CONTRACTS
  GET CONTRACT INFO <n>   RESET CONTRACT <n>   PERFDATA <contract>
  CREATE TASK FROM <file.yaml>   CREATE TASK <type> <n> <author> <prereq> <outcome>   APPEND TASK BODY <n> <line-no> <yaml line>
  FINALIZE TASK <n>   DELETE TASK <n>   LIST TASKS   GET TASK INFO <n>   GET TASK BODY <n>
  CREATE TASKRUNNER <n>   ASSIGN TASK <task> TO <runner> WITH <N|ALL> PEERS   ASSIGN TASK <task> TO <runner> TARGET <swop>
  WAIT FOR TASKRUNNER <runner> [timeout-seconds]   GET TASKRUNNER STATUS <runner>   GET TASKRUNNER PEER STATUS <runner> [<swop-index|swop>]
  LIST TASKRUNNERS   LIST TASKRUNNER PEERS [<runner>]   RESET TASKRUNNER <runner>
  LIST NODES   SLEEP <seconds>   cd <dir>   pwd()   ls()   HELP"""


@dataclass(frozen=True)
class Command:
    line: int
    text: str
    name: str
    args: dict[str, str]


def parse_line(text: str, line: int, source: str = "<prompt>") -> Command | None:
    """One line to a Command; None for blank lines and comments; ConfigError for anything else."""
    stripped = text.split("#", 1)[0].strip() if not text.lstrip().startswith("cd ") else text.strip()
    if not stripped:
        return None
    for name, pattern in GRAMMAR:
        m = pattern.match(stripped)
        if m:
            args = {k: v for k, v in m.groupdict().items() if v is not None}
            if args.get("ip", "").upper() in _KEYWORDS:
                raise ConfigError(f"{source}:{line}: {stripped!r} names no host; HELP lists the commands")
            if "ip" in args:
                _check_sn_addresses(args, f"{source}:{line}")
            _check_numbers(args, f"{source}:{line}")
            return Command(line, stripped, name, args)
    raise ConfigError(f"{source}:{line}: unknown command {stripped!r}; HELP lists the commands")


def _check_sn_addresses(args: dict[str, str], where: str) -> None:
    """`WITH IP a,b:30305 [port]`: one SN or several, each IP or IP:PORT; an empty entry or a bad port
    is reported when the script is read, not when the line runs (entries without a port get theirs
    then: `port`, else --sn-api-port)."""
    from swarmlearn.sn.client import sn_address_parts  # here: keeps the grammar free of grpc

    port = args.get("port")
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ConfigError(f"{where}: port {port!r}: give a number from 1 to 65535, or leave it out")
    try:
        sn_address_parts(args["ip"], "IP")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_numbers(args: dict[str, str], where: str) -> None:
    """`[retries]` and APPEND TASK BODY's line number are whole numbers from 1; `WITH SERVICE
    host[:port]` is one address. Checked when the script is read."""
    from swarmlearn.sn.client import sn_address_parts

    for field, what in (("retries", "retries"), ("idx", "the body line number")):
        value = args.get(field)
        if value is not None and not (value.isdigit() and int(value) >= 1):
            raise ConfigError(f"{where}: {what} {value!r}: give a whole number from 1")
    if args.get("service") is not None:
        try:
            if len(sn_address_parts(args["service"], "SERVICE")) != 1:
                raise ConfigError(f"SERVICE: {args['service']!r}: name one service, host[:port]")
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def parse_script(path: Path) -> list[Command]:
    """Parses a whole init script up front, so a typo on line 40 is reported before line 1 runs."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: init script not found; check --usr-dir and --init-script-name") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the init script ({exc.strerror or exc})") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: the init script is not UTF-8 text (byte {raw[exc.start]:#04x}); "
                          f"save it as UTF-8") from None
    commands = []
    for number, line in enumerate(text.splitlines(), start=1):
        command = parse_line(line, number, str(path))
        if command is not None:
            commands.append(command)
    return commands
