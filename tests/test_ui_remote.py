"""The dashboard served beyond loopback, as someone on another machine meets it: `swarm ui --host
<the host's address>` on an emulated host (a network namespace of its own, tests/netns.py) serves
HTTPS with the ui certificate, and only to whoever opened the login URL it printed.

A small HTTPS client (this file, run as a script inside the host's namespace) checks the server as
a browser would: it trusts the swarm's CA and nothing else, checks that the certificate names the
address it opened, and follows no redirect, so that each answer is seen as sent."""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import sys
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

READY = "swarm ui ready on "
# Every page, the event stream and the static files: none may be served without the login cookie.
GUARDED_PATHS = ["", "tasks", "training", "ledger", "events?page=swarm", "static/plotly.min.js", "static/ui.css",
                 "static/ui.js"]


def fetch(url: str, cafile: str | None = None, cookie: str | None = None) -> dict:
    """One GET of `url` (https: trusting `cafile` alone); its status, headers and the start of its
    body, or the error that stopped it. An event stream is read to its first line only."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        # A cafile given: the system's authorities are not loaded, and the host name is checked.
        context = ssl.create_default_context(cafile=cafile)
        connection = http.client.HTTPSConnection(parts.hostname, parts.port, context=context, timeout=5)
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""),
                           headers={"Cookie": cookie} if cookie else {})
        response = connection.getresponse()
        streaming = response.getheader("content-type", "").startswith("text/event-stream")
        body = response.readline() if streaming else response.read()
        return {"status": response.status, "headers": [[k.lower(), v] for k, v in response.getheaders()],
                "body": body.decode(errors="replace")}
    except (OSError, http.client.HTTPException) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        connection.close()


if __name__ == "__main__":
    # Run inside the emulated host: argv[1] is a JSON list of fetch() keyword arguments.
    print(json.dumps([fetch(**request) for request in json.loads(sys.argv[1])]))
    sys.exit(0)


from conftest import SWARM, Procs, wait_until  # noqa: E402  (the client above runs without the test's imports)
from netns import Host, emulated_hosts  # noqa: E402
from swarmlearn.errors import ConfigError  # noqa: E402
from swarmlearn.pki import CertLayout  # noqa: E402
from swarmlearn.ui.app import Access  # noqa: E402


@dataclass
class RemoteUi:
    host: Host
    certs: CertLayout  # the swarm's certificates, made with the host's address as a name
    url: str
    login: str

    def fetch(self, *requests: dict) -> list[dict]:
        """fetch() each request from inside the host, trusting the swarm's CA unless a request says otherwise."""
        given = [{"cafile": str(self.certs.ca_cert), **r} for r in requests]
        done = subprocess.run(self.host.command([sys.executable, __file__, json.dumps(given)]), capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def get(self, path: str = "", **request) -> dict:
        return self.fetch({"url": self.url + path, **request})[0]


def header(answer: dict, name: str) -> str:
    return next((v for k, v in answer.get("headers", []) if k == name), "")


def ui_command(host: Host, certs: CertLayout, *extra: str) -> list[str]:
    return host.command([*SWARM, "ui", "--host", host.ip, "--port", "0", "--key", str(certs.key("ui")), "--cert",
                         str(certs.cert("ui")), "--capath", str(certs.capath), *extra])


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    work = tmp_path_factory.mktemp("ui-remote")
    with emulated_hosts(1) as hosts:
        host = hosts[0]
        made = subprocess.run([*SWARM, "gen-cert", "--out", str(work / "cert"), "--org", "test", "--san", host.ip],
                              capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        certs = CertLayout(work / "cert", 1)
        procs = Procs()
        try:
            sn = procs.start(host.command([*SWARM, "sn", "--sentinel", "--host-ip", "127.0.0.1", "--sn-api-port", "0",
                                           "--key", str(certs.key("sn")), "--cert", str(certs.cert("sn")),
                                           "--capath", str(certs.capath), "--data-dir", str(work / "sn")]))
            sn_address = sn.wait_for_line("SN ready on ").split("SN ready on ")[1].split()[0]
            ready = procs.start(ui_command(host, certs, "--sn-ip", sn_address)).wait_for_line(READY)
            url = ready.split(READY)[1].split()[0]
            yield RemoteUi(host, certs, url, ready.split("login: ")[1].strip())
        finally:
            procs.stop_all()  # before the namespace goes: a namespace someone still runs in outlives its name


def test_beyond_loopback_the_dashboard_is_https_and_prints_a_login_url(remote):
    assert remote.url == f"https://{remote.host.ip}:{urlsplit(remote.url).port}/"
    assert remote.login.startswith(remote.url + "?token=") and len(remote.login) > len(remote.url) + 30


def test_plain_http_gets_no_page(remote):
    answer = remote.get(url=remote.url.replace("https://", "http://"))
    assert "error" in answer, answer


def test_the_swarm_ca_verifies_the_certificate_for_the_address_and_another_ca_does_not(remote, foreign_certs):
    trusted, foreign = remote.fetch({"url": remote.url}, {"url": remote.url, "cafile": str(foreign_certs.ca_cert)})
    assert trusted.get("status") == 401, trusted  # the handshake passed; the page needs the token
    assert "SSLCertVerificationError" in foreign.get("error", ""), foreign


def test_without_the_token_every_page_stream_and_file_is_refused(remote):
    token = remote.login.split("token=")[1]
    wrong = "x" * len(token)
    answers = remote.fetch(*({"url": remote.url + path} for path in GUARDED_PATHS),
                           {"url": f"{remote.url}?token={wrong}"},
                           {"url": remote.url, "cookie": f"swarm_ui_token={wrong}"})
    assert [a.get("status") for a in answers] == [401] * len(answers), answers
    assert all(token not in a["body"] and "sn-1" not in a["body"] for a in answers)


def test_the_login_url_sets_a_strict_secure_cookie_that_opens_the_dashboard(remote):
    login = remote.get(url=remote.login)
    assert login.get("status") == 303 and header(login, "location") == "/", login
    cookie, *attributes = [part.strip() for part in header(login, "set-cookie").split(";")]
    assert cookie == "swarm_ui_token=" + remote.login.split("token=")[1]
    attributes = {a.lower() for a in attributes}
    assert {"httponly", "secure", "samesite=strict"} <= attributes, attributes

    pages = [remote.url + path for path in ("", "tasks", "training", "ledger")]
    assert wait_until(lambda: "sn-1" in remote.get(cookie=cookie)["body"], 15, every=0.3), remote.get(cookie=cookie)
    answers = remote.fetch(*({"url": page, "cookie": cookie} for page in pages),
                           {"url": remote.url + "events?page=swarm", "cookie": cookie},
                           {"url": remote.url + "static/ui.js", "cookie": cookie})
    assert [a.get("status") for a in answers] == [200] * len(answers), answers
    assert answers[-2]["body"].startswith("event: update"), answers[-2]


def refusal(command: list[str]) -> str:
    """The one line a `swarm ui` that must refuse to start wrote (a started one is killed at the timeout)."""
    refused = subprocess.run(command, capture_output=True, text=True, timeout=20)
    assert refused.returncode == 1, refused
    (line,) = refused.stderr.strip().splitlines()
    return line


def test_a_certificate_that_does_not_name_the_address_is_refused_at_start(remote, certs):
    # The session's certificates name loopback only: every browser would refuse them at this address.
    line = refusal(ui_command(remote.host, certs, "--sn-ip", "127.0.0.1:1"))
    assert f"does not name {remote.host.ip}" in line and f"swarm gen-cert --san {remote.host.ip}" in line, line


def test_only_a_ui_identity_serves_the_dashboard(remote):
    as_sn = ui_command(remote.host, remote.certs, "--sn-ip", "127.0.0.1:1")
    as_sn[as_sn.index(str(remote.certs.key("ui")))] = str(remote.certs.key("sn"))
    as_sn[as_sn.index(str(remote.certs.cert("ui")))] = str(remote.certs.cert("sn"))
    line = refusal(as_sn)
    assert "role sn" in line and "certificate of role ui" in line, line


def test_plain_http_beyond_loopback_is_refused_naming_the_certificate_to_give():
    with pytest.raises(ConfigError, match="--cert and --key of a ui identity"):
        Access.for_host("10.213.0.1", require_token=False, tls=False)
    assert Access.for_host("10.213.0.1", require_token=False, tls=True).token
