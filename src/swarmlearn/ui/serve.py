"""`swarm ui` as a library call: bind the port, follow the ledger, serve until signalled."""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from swarmlearn.background import Background
from swarmlearn.errors import CertificateError, ConfigError

log = logging.getLogger("swarmlearn.ui")

UI_PORT = 30306
# How long a stop waits for open pages' event streams before closing them.
SHUTDOWN_GRACE = 1.0
# Open connections at once (each open page holds one event stream, re-rendered on every change of the
# view); beyond this uvicorn answers 503, so no reader can make the dashboard render for thousands.
MAX_CONNECTIONS = 64


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


def certificate_names(cert) -> list[str]:
    """The host names and IP addresses a certificate is valid for (its subject alternative names)."""
    from cryptography import x509

    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*sans.get_values_for_type(x509.DNSName), *(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))]


def _names_host(names: list[str], host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        wanted = host.lower().rstrip(".")
        # A wildcard names one label: *.example.org covers dash.example.org, not example.org.
        return any(n.lower() == wanted or (n.startswith("*.") and wanted.partition(".")[2] == n[2:].lower())
                   for n in names)
    return any(_is_address(n) and ipaddress.ip_address(n) == address for n in names)


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def require_served_name(cert, cert_path: Path, host: str) -> None:
    """Beyond loopback, a browser opens https://HOST/ and refuses a certificate that does not name
    HOST, so the dashboard refuses to start with one (a wildcard address such as 0.0.0.0 names no
    host: whichever name browsers use is then the user's to put in the certificate)."""
    bare = host.strip("[]")
    if _is_address(bare) and ipaddress.ip_address(bare).is_unspecified:
        return
    names = certificate_names(cert)
    if not _names_host(names, bare):
        raise CertificateError(f"--cert {cert_path} does not name {host} (it names {', '.join(names) or 'nothing'}), "
                               f"so browsers would refuse it: issue one that does from the swarm's CA into a new "
                               f"folder (`swarm gen-cert --san {bare} --out NEW --ca-cert "
                               f"CERTS/ca/capath/ca-I-cert.pem --ca-key CERTS/ca/ca-I-key.pem`) and give its "
                               f"ui-I-key.pem and ui-I-cert.pem")


def serve(options: UiOptions, announce) -> None:
    """Serves the dashboard until SIGINT/SIGTERM. `announce(line)` is called with the ready line (URL,
    and the login URL when a token is needed)."""
    import uvicorn

    from swarmlearn.pki import Identity
    from swarmlearn.ui.app import Access, make_app, is_loopback
    from swarmlearn.ui.follow import start_following
    from swarmlearn.ui.view import SwarmView

    identity = Identity.load(options.key, options.cert, options.capath)
    identity.require_role("ui")
    tls = not is_loopback(options.host)
    if tls:
        require_served_name(identity.cert, options.cert, options.host)
    access = Access.for_host(options.host, options.require_token, tls)
    view = SwarmView()
    sock = bind(options.host, options.port)
    background = Background("ui")
    try:
        start_following(options.sn_addresses, identity, view, background)
        config = uvicorn.Config(make_app(view, access), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=SHUTDOWN_GRACE, limit_concurrency=MAX_CONNECTIONS,
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
