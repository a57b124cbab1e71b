"""The replicated ledger store: the entries of one ledger kept in an etcd cluster, for several SNs.

Keys, under a prefix that names the ledger:
  <prefix>/entries/<index, 20 digits>   the entry body bytes, written once
  <prefix>/head                         "<index> <hash>" of the last entry
An append is one etcd transaction: if the head is the one expected (absent, for entry 0), put the
entry and the new head together. A reader never sees an entry without its head, nor the reverse.

We speak etcd's gRPC API through our own declaration of the part we use (proto/etcd.proto), not a
client library: python-etcd3 cannot load under protobuf 7, aetcd is asyncio-only, and etcd3gw goes
through etcd's HTTP gateway; none lets us set what this store needs on every call (a deadline,
"require a leader", the move to the next member).

Bounds: the store refuses an entry over `max_entry_bytes` itself. etcd refuses any request over its
--max-request-bytes (1.5 MiB by default), so members must run with at least
`request_bytes_for(max_entry_bytes)`; etcd_member.start_cluster sets that.

Availability: every call has a deadline (CALL_TIMEOUT) and goes to one member; when that member does
not answer (or has no leader) the call moves on to the next endpoint, and keeps trying the cluster for
QUORUM_TIMEOUT before it fails with LedgerError("no quorum: ...").

Who may connect: every member must trust (--trusted-ca-file) only a CA that issues to SNs and etcd
members alone, never the swarm's CA. Whoever the members admit can read, rewrite and delete every key
here: erase the ledger, move its head, append entries no SN checked. A swarm's CA issues certificates
to every node of the swarm (and an admin's revocation is known only to the ledger, not to etcd), so the
SNs reach etcd with an identity of their own (swarm sn --etcd-cert/--etcd-key/--etcd-cacert). We do
not rely on etcd's RBAC instead: etcd 3.4 maps only a client certificate's common name to a user, and
common names are not unique across the organizations whose CAs a swarm trusts ("sn-1" exists in each).

Beside the ledger, under <prefix>/<folder>/<name>, the store keeps small keys (the SNs' shared
liveness, sn/liveness.py): they are not ledger entries.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import grpc

from swarmlearn.errors import ConfigError, HeadMoved, LedgerError, LedgerOutOfReach
from swarmlearn.ledger.entry import GENESIS_PREV_HASH, Entry
from swarmlearn.ledger.store import LedgerStore, StoredEntry
from swarmlearn.proto import etcd_kv_pb2 as mvcc
from swarmlearn.proto import etcd_pb2 as pb
from swarmlearn.proto import etcd_pb2_grpc as rpc

log = logging.getLogger("swarmlearn.ledger")

# One call to one member; a healthy member on a busy host answers well within it.
CALL_TIMEOUT = 2.0
# How long one operation keeps trying the cluster (through a leader election, ~1-2 s) before it
# reports no quorum.
QUORUM_TIMEOUT = 5.0
DEFAULT_MAX_ENTRY_BYTES = 1 << 20
# What a transaction adds to the entry it carries: keys, the head, framing.
REQUEST_OVERHEAD = 64 << 10
INDEX_DIGITS = 20
# How soon expire_values has etcd delete keys (etcd rounds a shorter lease up to its minimum).
EXPIRE_TTL = 2
# etcd's default --max-txn-ops: the most puts one transaction may carry.
MAX_TXN_OPS = 128
# The folders of the ledger itself, which keys beside it may not use.
LEDGER_FOLDERS = ("entries", "head")
# etcd answers a member without a leader with an error instead of serving stale reads or keeping a
# watch open that will never see another event.
REQUIRE_LEADER = (("hasleader", "true"),)
MOVE_ON_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# What gRPC's connection errors say when the member is up but the TLS handshake failed.
TLS_FAILURES = ("handshake failed", "TSI_")
# Reconnect soon after a member comes back; gRPC's default backoff grows to two minutes. Keepalive
# pings find a member that vanished without closing its connections (etcd refuses pings under 5 s).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # A read of many entries near the size bound is far over gRPC's default 4 MiB.
    ("grpc.max_receive_message_length", -1),
]


class TLSFiles(NamedTuple):
    """Mutual TLS with our certificates: the CA (a PEM file or a capath folder), our cert and key."""

    ca: Path
    cert: Path
    key: Path


def request_bytes_for(max_entry_bytes: int) -> int:
    """The --max-request-bytes etcd members need for entries up to `max_entry_bytes`."""
    return max_entry_bytes + REQUEST_OVERHEAD


def open_channel(endpoint: str, tls: TLSFiles | None) -> grpc.Channel:
    target = endpoint.split("://", 1)[-1]
    if tls is None:
        return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    from swarmlearn.pki import cert_to_pem, load_ca_certs

    try:
        roots = b"".join(cert_to_pem(cert) for _, cert in load_ca_certs(Path(tls.ca)))
        key, chain = Path(tls.key).read_bytes(), Path(tls.cert).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{exc.filename}: cannot read the etcd TLS file ({exc.strerror}); check the ledger's "
                          f"TLS settings") from None
    credentials = grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)
    return grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)


def prefix_end(key: bytes) -> bytes:
    """The end of etcd's key range holding every key that starts with `key`."""
    return key[:-1] + bytes([key[-1] + 1])


class _Stubs(NamedTuple):
    endpoint: str
    kv: rpc.KVStub
    watch: rpc.WatchStub
    lease: rpc.LeaseStub
    maintenance: rpc.MaintenanceStub
    cluster: rpc.ClusterStub


class _Members:
    """The cluster's client endpoints, one channel to each (opened on first use, with its stubs);
    calls go to the current member."""

    def __init__(self, endpoints: list[str], tls: TLSFiles | None):
        self.endpoints = list(endpoints)
        self._tls = tls
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, _Stubs] = {}
        self._current = 0
        self._lock = threading.Lock()

    def current(self) -> _Stubs:
        with self._lock:
            endpoint = self.endpoints[self._current]
            stubs = self._stubs.get(endpoint)
            if stubs is None:
                channel = self._channels[endpoint] = open_channel(endpoint, self._tls)
                stubs = self._stubs[endpoint] = _Stubs(
                    endpoint, rpc.KVStub(channel), rpc.WatchStub(channel), rpc.LeaseStub(channel),
                    rpc.MaintenanceStub(channel), rpc.ClusterStub(channel))
            return stubs

    def replace(self, endpoints: list[str]) -> None:
        """Uses `endpoints` from now on (the cluster's members changed), keeping the member in use if
        it is still one of them. Only the channels of members that left are closed: calls in flight
        on the others go on."""
        with self._lock:
            if endpoints == self.endpoints:
                return
            current = self.endpoints[self._current]
            for gone in set(self._channels) - set(endpoints):
                self._channels.pop(gone).close()
                self._stubs.pop(gone, None)
            self.endpoints = list(endpoints)
            self._current = self.endpoints.index(current) if current in self.endpoints else 0

    def move_on(self, failed: _Stubs, error: grpc.RpcError) -> None:
        if len(self.endpoints) == 1:
            return
        with self._lock:
            if self.endpoints[self._current] != failed.endpoint:
                return  # another thread already moved on from it (or the members changed)
            self._current = (self._current + 1) % len(self.endpoints)
            nxt = self.endpoints[self._current]
        log.warning("etcd member %s did not answer (%s); switching to %s", failed.endpoint, describe(error), nxt)

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._stubs.clear()


def describe(error: grpc.RpcError) -> str:
    return f"{error.code().name}: {error.details()}"


class _WatchStream:
    """One etcd Watch call with one watcher; a thread passes its responses (then None, or the error
    that ended it) to `inbox`. Closing cancels the call, and with it the watcher in etcd."""

    def __init__(self, stubs: _Stubs, create: pb.WatchCreateRequest, timeout: float | None):
        self.inbox: queue.Queue = queue.Queue()
        self._requests: queue.Queue = queue.Queue()
        self._requests.put(pb.WatchRequest(create_request=create))
        # The request stream stays open (a closed one ends the watch) until close() puts the sentinel.
        self._call = stubs.watch.Watch(iter(self._requests.get, None), timeout=timeout, metadata=REQUIRE_LEADER)
        threading.Thread(target=self._pump, daemon=True, name="etcd-watch").start()

    def _pump(self) -> None:
        try:
            for response in self._call:
                self.inbox.put(response)
            self.inbox.put(None)
        except grpc.RpcError as exc:
            self.inbox.put(exc)

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()


class EtcdStore(LedgerStore):
    def __init__(self, endpoints: list[str], prefix: str, tls: TLSFiles | tuple[Path, Path, Path] | None,
                 max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES, call_timeout: float = CALL_TIMEOUT,
                 quorum_timeout: float = QUORUM_TIMEOUT):
        if not endpoints:
            raise ConfigError("no etcd endpoints given; list the cluster's client URLs (host:port)")
        if not prefix or prefix.endswith("/"):
            raise ConfigError(f"etcd key prefix {prefix!r} must be non-empty and not end with '/'")
        self.prefix = prefix
        self.max_entry_bytes = max_entry_bytes
        self.call_timeout = call_timeout
        self.quorum_timeout = quorum_timeout
        self._members = _Members(endpoints, TLSFiles(*tls) if tls is not None else None)
        self._head_key = f"{prefix}/head".encode()
        self._entries = f"{prefix}/entries/".encode()
        self._entries_end = prefix_end(self._entries)
        # Connect now, so a wrong endpoint or certificate shows at start-up rather than at the first append.
        try:
            self._call("reach", lambda stubs: stubs.maintenance.Status, pb.StatusRequest())
        except BaseException:
            self._members.close()
            raise

    # ------------------------------------------------------------------------------------ calls

    def _call(self, what: str, method: Callable[[_Stubs], Callable], request, patience: float | None = None):
        """One request to the cluster, moving on to the next member for up to `patience` seconds
        (default: quorum_timeout)."""
        patience = self.quorum_timeout if patience is None else patience
        deadline = time.monotonic() + patience
        while True:
            stubs = self._members.current()
            timeout = max(0.05, min(self.call_timeout, deadline - time.monotonic()))
            try:
                return method(stubs)(request, timeout=timeout, metadata=REQUIRE_LEADER)
            except grpc.RpcError as exc:
                if exc.code() not in MOVE_ON_CODES:
                    raise self._refused(what, stubs, exc) from None
                self._members.move_on(stubs, exc)
                last = exc
            if time.monotonic() >= deadline:
                raise self._no_quorum(what, last, patience)
            time.sleep(0.1)  # a member that refuses connections fails at once; do not spin on it

    def _no_quorum(self, what: str, error: grpc.RpcError, patience: float) -> LedgerOutOfReach:
        members = ", ".join(self._members.endpoints)
        if any(sign in (error.details() or "") for sign in TLS_FAILURES):
            return LedgerOutOfReach(f"etcd cluster ({members}): the TLS handshake failed ({describe(error)}); the "
                               f"members and this store must present certificates from a CA the other side "
                               f"trusts, and use TLS on both sides or on neither")
        return LedgerOutOfReach(f"no quorum: the etcd cluster ({members}) could not {what} the ledger "
                           f"{self.prefix} within {patience:g}s (last: {describe(error)}); "
                           f"bring a majority of its members back up and check that they reach each other")

    def _refused(self, what: str, stubs: _Stubs, error: grpc.RpcError) -> LedgerError:
        details = error.details() or ""
        # etcd's own check ("request is too large"), or gRPC's on the message before it (over
        # --max-request-bytes plus gRPC framing room: "received message larger than max").
        if "request is too large" in details or "larger than max" in details:
            return LedgerError(f"etcd member {stubs.endpoint} refused to {what} ledger {self.prefix}: the request "
                               f"is over its --max-request-bytes; start the members with --max-request-bytes "
                               f"{request_bytes_for(self.max_entry_bytes)} or more (max_entry_bytes "
                               f"{self.max_entry_bytes} + {REQUEST_OVERHEAD})")
        return LedgerError(f"etcd member {stubs.endpoint} refused to {what} ledger {self.prefix} "
                           f"({describe(error)}); check its log and the TLS certificates")

    def _range(self, what: str, request: pb.RangeRequest) -> pb.RangeResponse:
        return self._call(what, lambda stubs: stubs.kv.Range, request)

    # ------------------------------------------------------------------------------------ keys

    def _entry_key(self, index: int) -> bytes:
        return self._entries + str(index).zfill(INDEX_DIGITS).encode()

    def _row(self, kv: mvcc.KeyValue) -> StoredEntry:
        suffix = kv.key[len(self._entries):]
        if len(suffix) != INDEX_DIGITS or not suffix.isdigit():
            raise LedgerError(f"etcd key {bytes(kv.key).decode(errors='replace')!r} is not a ledger entry "
                              f"(<prefix>/entries/<index, {INDEX_DIGITS} digits>): something other than an SN "
                              f"wrote under ledger {self.prefix}; delete that key (etcdctl del) and find out who "
                              f"could write there")
        return StoredEntry(int(suffix), hashlib.sha256(kv.value).hexdigest(), bytes(kv.value))

    def _parse_head(self, value: bytes) -> tuple[int, str]:
        try:
            index, digest = value.decode().split(" ")
            return int(index), digest
        except ValueError:
            raise LedgerError(f"etcd key {self._head_key.decode()} holds {value[:40]!r}, not '<index> <hash>': "
                              f"the prefix {self.prefix} holds something other than a ledger; choose "
                              f"another prefix") from None

    # ------------------------------------------------------------------------------------ the interface

    def head(self) -> tuple[int, str] | None:
        reply = self._range("read the head of", pb.RangeRequest(key=self._head_key))
        return self._parse_head(reply.kvs[0].value) if reply.kvs else None

    def append_if_head_is(self, expected_hash: str | None, entry: Entry) -> None:
        body = entry.body_bytes()
        self._check_before_append(expected_hash, entry, body)
        entry_key = self._entry_key(entry.index)
        if expected_hash is None:
            guard = pb.Compare(key=self._head_key, target=pb.Compare.CREATE, result=pb.Compare.EQUAL,
                               create_revision=0)
        else:
            guard = pb.Compare(key=self._head_key, target=pb.Compare.VALUE, result=pb.Compare.EQUAL,
                               value=f"{entry.index - 1} {expected_hash}".encode())
        request = pb.TxnRequest(
            compare=[guard],
            success=[pb.RequestOp(request_put=pb.PutRequest(key=entry_key, value=body)),
                     pb.RequestOp(request_put=pb.PutRequest(key=self._head_key,
                                                            value=f"{entry.index} {entry.hash}".encode()))],
            failure=[pb.RequestOp(request_range=pb.RangeRequest(key=self._head_key)),
                     pb.RequestOp(request_range=pb.RangeRequest(key=entry_key))])
        reply = self._call("append to", lambda stubs: stubs.kv.Txn, request)
        if reply.succeeded:
            return
        head_kvs, entry_kvs = (op.response_range.kvs for op in reply.responses)
        if entry_kvs and entry_kvs[0].value == body:
            return  # an earlier try of this very append landed; its reply was lost to a deadline
        head = self._parse_head(head_kvs[0].value) if head_kvs else None
        raise HeadMoved(f"ledger head is {head[0] if head else -1}:{(head[1] if head else '-')[:12]}, "
                        f"not {(expected_hash or '-')[:12]}")

    def _check_before_append(self, expected_hash: str | None, entry: Entry, body: bytes) -> None:
        if len(body) > self.max_entry_bytes:
            raise LedgerError(f"entry {entry.index} is {len(body)} bytes, over the etcd ledger store's bound "
                              f"max_entry_bytes={self.max_entry_bytes}; keep large data off the ledger (its "
                              f"hash goes on it)")
        if entry.prev_hash != (expected_hash or GENESIS_PREV_HASH):
            raise LedgerError(f"entry {entry.index} links to {entry.prev_hash[:12]} but is appended on head "
                              f"{(expected_hash or '-')[:12]}; build the entry on the head it expects")
        if expected_hash is None and entry.index != 0:
            raise HeadMoved(f"an empty ledger starts at entry 0, not {entry.index}")

    def read_raw(self, start: int = 0, limit: int | None = None) -> list[StoredEntry]:
        return self._read_from(start, limit)[0]

    def _read_from(self, start: int, limit: int | None) -> tuple[list[StoredEntry], int, bool]:
        """Entries from `start`, the store revision they were read at, and whether more follow."""
        reply = self._range("read", pb.RangeRequest(key=self._entry_key(start), range_end=self._entries_end,
                                                    limit=limit or 0))
        return [self._row(kv) for kv in reply.kvs], reply.header.revision, reply.more

    def wait_for(self, index: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        key = self._entry_key(index)
        while True:
            reply = self._range("read", pb.RangeRequest(key=key, count_only=True))
            if reply.count:
                return True
            if deadline - time.monotonic() <= 0:
                return False
            # The entry is not there at this revision: an etcd watch from the next one sees it appear.
            outcome = self._await_put(key, reply.header.revision + 1, deadline)
            if outcome is not None:
                return outcome

    def _await_put(self, key: bytes, revision: int, deadline: float) -> bool | None:
        """True once `key` is put, False at the deadline; None when the watch ended early (a compaction,
        a member gone) and the caller must read again."""
        stubs = self._members.current()
        stream = _WatchStream(stubs, pb.WatchCreateRequest(key=key, start_revision=revision),
                              timeout=max(0.0, deadline - time.monotonic()))
        try:
            while True:
                item = stream.inbox.get()
                if isinstance(item, grpc.RpcError):
                    if item.code() == grpc.StatusCode.DEADLINE_EXCEEDED or time.monotonic() >= deadline:
                        return False
                    if item.code() not in MOVE_ON_CODES:
                        raise self._refused("watch", stubs, item)
                    self._members.move_on(stubs, item)
                    time.sleep(0.1)
                    return None
                if item is None or item.canceled:
                    return None
                if any(event.type == mvcc.Event.PUT for event in item.events):
                    return True
        finally:
            stream.close()

    def watch(self, start: int, should_stop: Callable[[], bool], batch: int = 256,
              poll: float = 0.5) -> Iterator[StoredEntry]:
        """Yields stored entries from `start` on: what a read finds, then what one etcd watch from the
        read's revision brings; a watch that ends (compaction, a member gone) resumes with a read from
        the next index. Raises LedgerError when the cluster has no quorum."""
        next_index = start
        while not should_stop():
            rows, revision, more = self._read_from(next_index, batch)
            for row in rows:
                yield row
                next_index = row.index + 1
            if more:
                continue
            for row in self._follow(next_index, revision + 1, should_stop, poll):
                yield row
                next_index = row.index + 1

    def _follow(self, next_index: int, revision: int, should_stop: Callable[[], bool],
                poll: float) -> Iterator[StoredEntry]:
        """Entries from `next_index` on as one watch from `revision` brings them, until should_stop()
        or the watch ends."""
        stubs = self._members.current()
        stream = _WatchStream(stubs, pb.WatchCreateRequest(key=self._entry_key(next_index),
                                                           range_end=self._entries_end,
                                                           start_revision=revision), timeout=None)
        try:
            while not should_stop():
                try:
                    item = stream.inbox.get(timeout=poll)
                except queue.Empty:
                    continue
                if isinstance(item, grpc.RpcError):
                    if item.code() not in MOVE_ON_CODES:
                        raise self._refused("watch", stubs, item)
                    self._members.move_on(stubs, item)
                    time.sleep(0.1)
                    return
                if item is None:
                    return
                if item.canceled:
                    self._log_cancelled(next_index, item)
                    return
                for event in item.events:
                    row = self._row(event.kv)
                    if event.type != mvcc.Event.PUT or row.index < next_index:
                        continue
                    if row.index > next_index:
                        return  # not the next entry: a read fills the gap
                    yield row
                    next_index += 1
        finally:
            stream.close()

    def _log_cancelled(self, next_index: int, response: pb.WatchResponse) -> None:
        if response.compact_revision:
            log.info("ledger %s: etcd compacted its history up to revision %d under the watch from entry %d; "
                     "reading on from entry %d", self.prefix, response.compact_revision, next_index, next_index)
        else:
            log.warning("ledger %s: etcd cancelled the watch from entry %d (%s); reading on from there",
                        self.prefix, next_index, response.cancel_reason or "no reason given")

    # ------------------------------------------------------------------------------------ beside the ledger

    def _side_key(self, folder: str, name: str = "") -> bytes:
        if not folder or "/" in folder or folder in LEDGER_FOLDERS:
            raise ValueError(f"folder {folder!r} is not one beside the ledger")
        return f"{self.prefix}/{folder}/{name}".encode()

    def put_values(self, folder: str, values: dict[str, bytes]) -> None:
        """Puts <prefix>/<folder>/<name> = value for each of `values`, in as few transactions as etcd allows."""
        items = sorted(values.items())
        for start in range(0, len(items), MAX_TXN_OPS):
            puts = [pb.RequestOp(request_put=pb.PutRequest(key=self._side_key(folder, name), value=value))
                    for name, value in items[start:start + MAX_TXN_OPS]]
            self._call(f"write {folder}", lambda stubs: stubs.kv.Txn, pb.TxnRequest(success=puts))

    def expire_values(self, folder: str, values: dict[str, bytes], ttl: int = EXPIRE_TTL,
                      patience: float | None = None) -> None:
        """Has etcd delete <prefix>/<folder>/<name> for each of `values` about `ttl` seconds from now: puts
        them again (with these values) on a new lease that nobody renews. (Our etcd.proto declares no
        DeleteRange; a lease does the same without it.)"""
        grant = self._call(f"expire {folder}", lambda stubs: stubs.lease.LeaseGrant, pb.LeaseGrantRequest(TTL=ttl),
                           patience)
        if grant.error:
            raise LedgerError(f"etcd refused a lease for ledger {self.prefix}: {grant.error}")
        items = sorted(values.items())
        for start in range(0, len(items), MAX_TXN_OPS):
            puts = [pb.RequestOp(request_put=pb.PutRequest(key=self._side_key(folder, name), value=value,
                                                           lease=grant.ID))
                    for name, value in items[start:start + MAX_TXN_OPS]]
            self._call(f"expire {folder}", lambda stubs: stubs.kv.Txn, pb.TxnRequest(success=puts), patience)

    def read_folder(self, folder: str, patience: float | None = None,
                    limit: int = 0) -> tuple[dict[str, bytes], bool]:
        """The keys <prefix>/<folder>/<name> as {name: value}, in one read of at most `limit` keys (0: all),
        and whether more were left out; tries the cluster for `patience` seconds (default: quorum_timeout)."""
        key = self._side_key(folder)
        reply = self._call(f"read {folder}", lambda stubs: stubs.kv.Range,
                           pb.RangeRequest(key=key, range_end=prefix_end(key), limit=limit), patience)
        return {kv.key[len(key):].decode(errors="replace"): bytes(kv.value) for kv in reply.kvs}, reply.more

    # ------------------------------------------------------------------------------------ the cluster's members

    @property
    def endpoints(self) -> list[str]:
        return list(self._members.endpoints)

    def use_endpoints(self, endpoints: list[str]) -> None:
        """Talks to these members from now on (a member joined or left the cluster)."""
        if endpoints:
            self._members.replace(endpoints)

    def members(self) -> list[pb.Member]:
        return list(self._call("list the members of", lambda stubs: stubs.cluster.MemberList,
                               pb.MemberListRequest()).members)

    def add_learner(self, peer_url: str) -> pb.MemberAddResponse:
        """Adds a member that will listen for its peers at `peer_url`, as a learner: it receives the log but
        does not vote, so a member that never comes up costs the cluster nothing of its quorum."""
        return self._call("add a member to", lambda stubs: stubs.cluster.MemberAdd,
                          pb.MemberAddRequest(peerURLs=[peer_url], isLearner=True))

    def promote(self, member_id: int) -> list[pb.Member]:
        """Makes learner `member_id` a voting member; etcd refuses (FAILED_PRECONDITION, a LedgerError
        here) while the learner is behind its leader."""
        return list(self._call("promote a member of", lambda stubs: stubs.cluster.MemberPromote,
                               pb.MemberPromoteRequest(ID=member_id)).members)

    def remove_member(self, member_id: int) -> None:
        self._call("remove a member from", lambda stubs: stubs.cluster.MemberRemove,
                   pb.MemberRemoveRequest(ID=member_id))

    def status(self) -> pb.StatusResponse:
        """The Status of the member in use (its raft index, whether it is a learner)."""
        return self._call("reach", lambda stubs: stubs.maintenance.Status, pb.StatusRequest())

    # ------------------------------------------------------------------------------------ restoring a backup

    def holds_keys(self) -> bool:
        """Whether anything lies under <prefix>/: a ledger, keys beside it, or a restore cut short."""
        key = f"{self.prefix}/".encode()
        reply = self._range("look into", pb.RangeRequest(key=key, range_end=prefix_end(key), count_only=True))
        return reply.count > 0

    def put_restored(self, rows: list[StoredEntry]) -> None:
        """Puts entries as a verified backup holds them, in one transaction that holds only while the ledger
        has no head (no SN appended here meanwhile). At most MAX_TXN_OPS rows whose bodies fit in one
        request (max_entry_bytes); the head is put last, with put_restored_head."""
        puts = [pb.RequestOp(request_put=pb.PutRequest(key=self._entry_key(row.index), value=row.body))
                for row in rows]
        reply = self._call("restore", lambda stubs: stubs.kv.Txn,
                           pb.TxnRequest(compare=[self._no_head()], success=puts))
        if not reply.succeeded:
            raise self._written_meanwhile()

    def put_restored_head(self, index: int, digest: str) -> None:
        """Puts the head over entries put_restored wrote, unless the ledger got a head meanwhile."""
        value = f"{index} {digest}".encode()
        reply = self._call("restore", lambda stubs: stubs.kv.Txn, pb.TxnRequest(
            compare=[self._no_head()], success=[pb.RequestOp(request_put=pb.PutRequest(key=self._head_key,
                                                                                      value=value))],
            failure=[pb.RequestOp(request_range=pb.RangeRequest(key=self._head_key))]))
        if reply.succeeded or reply.responses[0].response_range.kvs[0].value == value:
            return  # put now, or by an earlier try whose reply was lost to a deadline
        raise self._written_meanwhile()

    def _no_head(self) -> pb.Compare:
        return pb.Compare(key=self._head_key, target=pb.Compare.CREATE, result=pb.Compare.EQUAL, create_revision=0)

    def _written_meanwhile(self) -> LedgerError:
        return LedgerError(f"ledger {self.prefix} got a head while a backup was restored into it: an SN wrote there; "
                           f"stop every SN of this prefix and restore into a new, empty --etcd-prefix")

    def close(self) -> None:
        self._members.close()
