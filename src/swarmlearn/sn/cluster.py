"""An SN that runs its own etcd member (`swarm sn --ledger etcd` without --etcd-endpoints): the sentinel
founds a one-member cluster; any other SN joins it through any running SN's API, as a learner first,
promoted to a voting member once it has caught up; an SN restarted on its data dir restarts its member.

A learner receives the log but does not vote, so a join that fails midway (the member never comes up,
cannot reach its peers, never catches up) costs the cluster nothing of its quorum; the joining SN then
removes its learner and says why. etcd 3.4 admits one learner at a time, so SNs join one after another.

Who may join: the serving SN asks the ledger's policy (ledger/policy.may_join_cluster): an SN registered
with the caller's certificate, not revoked. The request declares only where the new member listens for
its peers and the ledger certificate it will present, and both are bounded here.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from swarmlearn import pki
from swarmlearn.errors import ConfigError, LedgerError, SwarmError
from swarmlearn.ledger.etcd_member import Bootstrap, EtcdMember, forget_member, own_member, start_member
from swarmlearn.ledger.etcd_store import EtcdStore, TLSFiles

log = logging.getLogger("swarmlearn.sn")

# etcd advises clusters of up to 7 voting members; more slow every write and add nothing to availability.
MAX_MEMBERS = 7
MAX_URL_CHARS = 256
MAX_CERT_BYTES = 16 << 10
HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
# A learner is promoted once its committed raft index is within this of its leader's (etcd itself then
# checks that it is in sync, and refuses otherwise: we retry until PROMOTE_TIMEOUT).
CATCH_UP_GAP = 10
PROMOTE_TIMEOUT = 30.0
PROMOTE_RETRY = 0.2


@dataclass(frozen=True)
class MemberPlan:
    """Where the SN's own member listens (ports None: the defaults, or what a restart recorded; 0: free
    ones) and the SN APIs to join through (empty for the sentinel)."""

    host: str
    client_port: int | None
    peer_port: int | None
    join_via: tuple[str, ...] = ()
    # The sentinel founds the cluster when its member has no data yet.
    found: bool = False


def start_own_member(plan: MemberPlan, data_dir: Path, name: str, tls: TLSFiles, identity: pki.Identity,
                     sn_address: str, max_entry_bytes: int) -> EtcdMember:
    """Starts the SN's member and returns it, serving: restarted from its data, founding a new cluster
    (no SN to join through), or joined through `plan.join_via`. Raises LedgerError/ConfigError."""
    member, restarting = own_member(data_dir, name, plan.host, plan.client_port, plan.peer_port)
    if restarting:
        log.info("restarting etcd member %s from %s", name, member.data_dir)
        start_member(member, tls, None, max_entry_bytes)
    elif not plan.join_via:
        if not plan.found:
            raise ConfigError(f"{member.data_dir} holds no etcd member yet: start the first SN with --sentinel, "
                              f"the others with --sentinel-ip (and --sentinel-api-port) of a running SN to join")
        log.info("founding the etcd cluster: member %s at %s", name, member.peer_url)
        start_member(member, tls, Bootstrap(f"{name}={member.peer_url}", "new", f"swarmlearn-{secrets.token_hex(6)}"),
                     max_entry_bytes)
    else:
        join_cluster(member, plan.join_via, identity, tls, sn_address, max_entry_bytes)
    return member


def join_cluster(member: EtcdMember, via: tuple[str, ...], identity: pki.Identity, tls: TLSFiles, sn_address: str,
                 max_entry_bytes: int) -> None:
    """Has a running SN add `member` as a learner, starts it, and promotes it once in sync. On failure the
    learner is removed and its data forgotten before LedgerError says why."""
    from swarmlearn.sn.client import SNClient

    with SNClient(list(via), identity) as sn:
        sn.wait_ready()
        # The ledger must know this SN before the policy lets it add a member.
        sn.register("sn", sn_address)
        reply = sn.join_cluster(member.peer_url, Path(tls.cert).read_bytes())
        through = sn.address
    voters = [url for m in reply.members if not m.is_learner for url in m.client_urls]
    initial = ",".join(f"{m.name or member.name}={url}" for m in reply.members for url in m.peer_urls)
    log.info("SN %s added etcd member %s (%x) as a learner; starting it", through, member.name, reply.member_id)
    admin = None
    try:
        admin = EtcdStore(voters, "/swarmlearn", tls)
        start_member(member, tls, Bootstrap(initial, "existing"), max_entry_bytes)
        _promote_when_in_sync(admin, member, reply.member_id, tls)
    except BaseException as exc:
        why = _undo_join(admin, member, reply.member_id)
        if isinstance(exc, SwarmError):
            raise LedgerError(f"joining the etcd cluster through SN {through} failed: {_first_line(exc)}; {why}") from None
        raise
    finally:
        if admin is not None:
            admin.close()
    log.info("etcd member %s is a voting member of the cluster", member.name)


def _promote_when_in_sync(admin: EtcdStore, member: EtcdMember, member_id: int, tls: TLSFiles) -> None:
    learner = EtcdStore([member.endpoint], "/swarmlearn", tls)
    deadline = time.monotonic() + PROMOTE_TIMEOUT
    last = "no answer yet"
    try:
        while time.monotonic() < deadline:
            if not member.running:
                raise LedgerError(f"etcd member {member.name} exited; its log ({member.log_path}) ends:\n"
                                  f"{member.log_tail()}")
            try:
                behind = admin.status().raftIndex - learner.status().raftIndex
                if behind <= CATCH_UP_GAP:
                    admin.promote(member_id)
                    return
                last = f"{behind} raft entries behind its leader"
            except LedgerError as exc:
                if "in sync" not in str(exc):
                    raise
                last = "etcd says it is not in sync with its leader yet"
            time.sleep(PROMOTE_RETRY)
    finally:
        learner.close()
    raise LedgerError(f"etcd member {member.name} did not catch up with its cluster within {PROMOTE_TIMEOUT:g}s "
                      f"({last}); its log ({member.log_path}) ends:\n{member.log_tail()}")


def _undo_join(admin: EtcdStore | None, member: EtcdMember, member_id: int) -> str:
    """Stops the member, removes its learner from the cluster and forgets its data; says what was done."""
    member.stop()
    removed = "the learner was removed from the cluster"
    try:
        if admin is None:
            raise LedgerError("no voting member could be reached")
        admin.remove_member(member_id)
    except LedgerError as exc:
        removed = (f"its learner {member_id:x} could not be removed ({_first_line(exc)}): remove it with `etcdctl member "
                   f"remove {member_id:x}`, as no other SN can join while it is there")
    forget_member(member)
    return removed


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# ------------------------------------------------------------------------------------ the serving SN's checks

def peer_url_refusal(peer_url: str) -> str | None:
    """Why a JoinCluster's peer URL is refused: one https://HOST:PORT, nothing else; None if it is fine."""
    if not peer_url or len(peer_url) > MAX_URL_CHARS:
        return f"peer_url must be one URL of 1-{MAX_URL_CHARS} characters"
    try:
        parts = urlsplit(peer_url)
        port = parts.port
    except ValueError as exc:
        return f"peer_url {peer_url[:80]!r} is not a URL ({exc})"
    if parts.scheme != "https" or not parts.hostname or port is None or port < 1:
        return f"peer_url {peer_url[:80]!r} must be https://HOST:PORT (members speak mutual TLS only)"
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        return f"peer_url {peer_url[:80]!r} must be https://HOST:PORT and nothing more"
    try:
        ipaddress.ip_address(parts.hostname)
    except ValueError:
        if not HOST_NAME.fullmatch(parts.hostname):
            return f"peer_url host {parts.hostname[:80]!r} is neither an IP address nor a host name"
    return None


def ledger_cert_refusal(pem: bytes, cacert: Path) -> str | None:
    """Why the ledger certificate a joining SN declares would be refused by the cluster's members (not
    issued by the ledger CA they trust, or not an SN's); None if they would admit it. It spares the
    cluster a learner that could never reach its peers."""
    if not pem or len(pem) > MAX_CERT_BYTES:
        return f"ledger_cert must be one PEM certificate of at most {MAX_CERT_BYTES} bytes"
    try:
        cert = pki.cached_cert(pem)
    except ValueError:
        return "ledger_cert is not a PEM certificate"
    cas = [ca for _, ca in pki.load_ca_certs(cacert)]
    if not any(pki.issued_by(cert, ca) for ca in cas):
        return (f"the joining SN's --etcd-cert ({pki.pki_subject(cert)}) is not issued by the ledger CA the cluster "
                f"trusts ({', '.join(pki.pki_subject(ca) for ca in cas)}); give it a certificate of that CA")
    ident = pki.swarm_id(cert)
    if ident is not None and ident.role != "sn":
        return f"the joining SN's --etcd-cert is an {ident.role} certificate; the ledger CA's sn certificates only"
    return None
