"""`swarm ui` as a library call: bind the port, follow the ledger, serve until signalled."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from swarmlearn.background import Background
from swarmlearn.errors import ConfigError

log = logging.getLogger("swarmlearn.ui")

UI_PORT = 30306
# How long a stop waits for open pages' event streams before closing them.
SHUTDOWN_GRACE = 1.0


@dataclass
class UiOptions:
    sn_addresses: list[str]
    key: Path
    cert: Path
    capath: Path
    host: str = "127.0.0.1"
    port: int = UI_PORT
    require_token: bool = False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: the OS chooses); ConfigError when it is taken."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); choose another "
                          f"--port (0 lets the OS choose)") from None
    sock.listen(128)
    return sock


def serve(options: UiOptions, announce) -> None:
    """Serves the dashboard until SIGINT/SIGTERM. `announce(line)` is called with the ready line (URL,
    and the login URL when a token is needed)."""
    import uvicorn

    from swarmlearn.pki import Identity
    from swarmlearn.ui.app import Access, make_app, is_loopback
    from swarmlearn.ui.follow import start_following
    from swarmlearn.ui.view import SwarmView

    identity = Identity.load(options.key, options.cert, options.capath)
    tls = not is_loopback(options.host)
    access = Access.for_host(options.host, options.require_token, tls)
    view = SwarmView()
    sock = bind(options.host, options.port)
    background = Background("ui")
    try:
        start_following(options.sn_addresses, identity, view, background)
        config = uvicorn.Config(make_app(view, access), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=SHUTDOWN_GRACE,
                                ssl_keyfile=str(options.key) if tls else None,
                                ssl_certfile=str(options.cert) if tls else None)
        server = uvicorn.Server(config)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        url = f"{'https' if tls else 'http'}://{shown}:{port}/"
        login = f" login: {url}?token={access.token}" if access.token else ""
        announce(f"swarm ui ready on {url} (following SN {', '.join(options.sn_addresses)}){login}")
        server.run(sockets=[sock])
    finally:
        background.close()
        sock.close()
