"""Container host names of the original's files (`sn1`, `sl1`, `swop1`, `user1`) mapped to the host
that runs that node, where the original had Docker's network resolve them.

A name resolves, first match wins:
1. an IP address: itself;
2. `hosts` files (in /etc/hosts form: `IP name [alias...]`, `#` comments; a SWOP's and a SWCI's
   --usr-dir, then the folder above it), the first file that names the host winning: what the user
   wrote wins over anything we infer;
3. `local`: names of nodes that this host runs (a SWOP's profile: its nodes' slhostname and
   usrhostname, and the SWOP's own name) -> 127.0.0.1;
4. `registry`: the SN's node registry (`SNClient.query("nodes")["nodes"]`, or LedgerState.nodes): the
   host part of the node's registered address. A name matches a node id exactly, else ignoring case,
   `-` and `_` (`sn1` is our `sn-1`); two nodes matching that loosely match neither. A node registered
   without an address (a SWOP) or on a wildcard address (0.0.0.0: where it listens, not which host it
   is) tells nothing;
5. this host's resolver (DNS, /etc/hosts), for names that are real host names.

None when nothing knows the name: a caller waiting for it (`WAIT FOR IP sn1`) asks again later.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

HOSTS_FILE = "hosts"  # in a --usr-dir, the folder above it, or a SWOP's workspace
LOCAL_ADDRESS = "127.0.0.1"


def resolve(name: str, *, hosts_file: str | Path | Sequence[str | Path] | None = None,
            registry: Mapping[str, Any] | None = None, local: Iterable[str] = (), use_dns: bool = True) -> str | None:
    """The address of the host that runs the node called `name` (see the module docstring for the
    order of the sources), or None when none of them knows it. `hosts_file`: one file or several, read
    in order."""
    name = name.strip()
    if not name:
        return None
    if _is_ip(name):
        return name.strip("[]")
    files = [hosts_file] if isinstance(hosts_file, (str, Path)) else list(hosts_file or ())
    for file in files:
        found = read_hosts(file).get(name.lower())
        if found is not None:
            return found
    if name.lower() in {n.lower() for n in local if n}:
        return LOCAL_ADDRESS
    if registry:
        found = _from_registry(name, registry)
        if found is not None:
            return found
    return _from_dns(name) if use_dns else None


def read_hosts(path: str | Path) -> dict[str, str]:
    """An /etc/hosts-form file as {lower-case name: IP}; a missing file is empty, the first line that
    names a host wins (as in /etc/hosts). Raises ValueError naming the file and line of a bad IP."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    names: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if not _is_ip(fields[0]) or len(fields) < 2:
            raise ValueError(f"{path}:{number}: {line.strip()!r} is not `IP name [alias...]`; write the "
                             f"address first, then the names it has")
        for host in fields[1:]:
            names.setdefault(host.lower(), fields[0])
    return names


def _from_registry(name: str, registry: Mapping[str, Any]) -> str | None:
    node = registry.get(name)
    if node is None:
        loose = [v for k, v in registry.items() if _loose(k) == _loose(name)]
        node = loose[0] if len(loose) == 1 else None
    if node is None:
        return None
    address = node.get("address", "") if isinstance(node, Mapping) else getattr(node, "address", node)
    host = _host_part(str(address or ""))
    if not host or (_is_ip(host) and ipaddress.ip_address(host).is_unspecified):
        return None
    return host


def _host_part(address: str) -> str:
    """"10.0.0.1:30304" -> "10.0.0.1"; "[::1]:30304" -> "::1"; a unix socket path -> ""."""
    if address.startswith(("unix:", "/")):
        return ""
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    host, sep, port = address.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else address


def _from_dns(name: str) -> str | None:
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        return None
    addresses = [info[4][0] for info in infos]
    ipv4 = [a for a in addresses if ":" not in a]
    return (ipv4 or addresses or [None])[0]


def _loose(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True
