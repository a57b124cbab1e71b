"""The SL's side of the local channel to its own ML process (the wire is swarmlearn/callback/frames.py).

Only that ML may reach it: a Unix socket in a folder only this user may enter, or a TCP port whose
callers must open with this SL's secret (SWARM_SL_TOKEN), compared in constant time. One connection
is one conversation: a `hello` (protocol version, and the secret on TCP), then requests answered in
turn: `join` a contract, `sync` tensors (answered with the merged ones once the round is over),
`report` metrics. A malformed frame ends its connection with a one-line error; the SL stays up.
"""

from __future__ import annotations

import hmac
import logging
import math
import socket
import threading
from pathlib import Path

from swarmlearn.callback import frames
from swarmlearn.defaults import TOKEN_ENV
from swarmlearn.errors import ConfigError, SwarmError

log = logging.getLogger("swarmlearn.sl")

# Connections served at once; an ML uses one (a few in tests and benchmarks). Beyond it a caller is
# refused at once rather than left waiting.
MAX_CONNECTIONS = 8
# How often the accept loop looks at the SL's stop flag.
ACCEPT_POLL = 0.5
# Numbers a metrics report may carry (anything else in it is refused), besides kind and metric_name.
REPORT_NUMBERS = ("epoch", "loss", "metric", "total_epochs", "epsilon", "delta", "client_epsilon", "client_delta")
# Recorded only where the ML sent them: the privacy its training has spent (swarmlearn.dp), ε at δ.
OPTIONAL_NUMBERS = ("total_epochs", "epsilon", "delta", "client_epsilon", "client_delta")


class Refusal(SwarmError):
    """A request the SL answers with an error and goes on serving; `code` names its kind."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class LocalChannel:
    def __init__(self, node, address: str, token: str | None):
        self.node = node
        self.address = address
        self._token = token.encode() if token else None
        self._listener: socket.socket | None = None
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> str:
        """Listens and serves from the SL's background threads; returns the address actually bound
        (a TCP port 0 becomes the port the OS chose)."""
        family, target = frames.parse_address(self.address)
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family != socket.AF_UNIX:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            elif not str(target).startswith("\0"):
                Path(str(target)).unlink(missing_ok=True)
            listener.bind(target)
            listener.listen(MAX_CONNECTIONS)
        except OSError as exc:
            listener.close()
            raise ConfigError(f"cannot listen on {self.address} ({exc.strerror or exc}): the port is in use, the "
                              f"address is not this host's or the socket path is not writable; pick another "
                              f"--ml-addr") from None
        listener.settimeout(ACCEPT_POLL)
        self._listener = listener
        if family != socket.AF_UNIX:
            host, port = listener.getsockname()[:2]
            self.address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        self.node.background.start("ml-accept", self._accept)
        return self.address

    def stop(self) -> None:
        """Stops listening and ends every open conversation (its ML sees the connection close)."""
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            for conn in self._open:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _accept(self) -> None:
        stopping = self.node.background.stopping
        while not stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return  # closed by stop()
            conn.settimeout(None)
            if not self._slots.acquire(blocking=False):
                _refuse(conn, "busy", f"this SL already serves {MAX_CONNECTIONS} ML connections; close one first")
                continue
            with self._lock:
                self._open.add(conn)
            self.node.background.start("ml-conn", self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._greet(conn)
            while not self.node.background.stopping.is_set():
                header, data = frames.receive(conn)
                try:
                    self._answer(conn, header, data)
                except Refusal as exc:
                    frames.send(conn, {"ok": False, "code": exc.code, "error": str(exc)})
        except frames.FrameError as exc:
            log.debug("ML connection ended: %s", exc)
            _refuse(conn, "invalid", str(exc))
        except Refusal as exc:
            _refuse(conn, exc.code, str(exc))
        except OSError as exc:
            log.debug("ML connection lost: %s", exc)
        except Exception as exc:  # noqa: BLE001  (a bug of ours: the ML is told, not just cut off)
            log.exception("ML connection ended by an internal error")
            _refuse(conn, "internal", f"internal error in SL {self.node.node_id}: {exc!r}; see its log")
        finally:
            with self._lock:
                self._open.discard(conn)
            conn.close()
            self._slots.release()

    def _greet(self, conn: socket.socket) -> None:
        header, _ = frames.receive(conn)
        if header.get("op") != "hello":
            raise Refusal("invalid", "a connection must open with a hello frame (use swarmlearn's SwarmCallback)")
        if header.get("protocol") != frames.PROTOCOL:
            raise Refusal("invalid", f"local-channel protocol {header.get('protocol')!r} is not this SL's "
                                     f"{frames.PROTOCOL}: install the same swarmlearn version on both sides")
        if self._token is not None:
            given = header.get("token")
            given = given.encode() if isinstance(given, str) else b""
            if not hmac.compare_digest(given, self._token):
                raise Refusal("unauthenticated", f"this SL's ML channel needs its secret: set {TOKEN_ENV} to the "
                                                 f"value in the SL's ready line")
        frames.send(conn, {"ok": True, "node_id": self.node.node_id})

    def _answer(self, conn: socket.socket, header: dict, data: bytes) -> None:
        op = header.get("op")
        if op == "join":
            frames.send(conn, self._join(header))
        elif op == "sync":
            blob = frames.receive_blob(conn, header, data)  # read all of it, so the stream stays in step
            reply, merged = self._sync(header, blob)
            frames.send_blob(conn, reply, merged)
        elif op == "report":
            self._report(header)
            frames.send(conn, {"ok": True})
        else:
            raise Refusal("invalid", f"unknown request {str(op)[:40]!r}: one of join, sync, report")

    def _join(self, header: dict) -> dict:
        contract = _field(header, "contract", str, "default") or "default"
        min_peers = _field(header, "min_peers", int, 1)
        weightage = _field(header, "weightage", (int, float), 1.0)
        # None or "": the method the contract's creator chose, or that its members use (else mean).
        merge_method = _field(header, "merge_method", str, "") or ""
        # {"clip", "noise_multiplier", "delta"}: client-level DP (secure_mean); the ledger checks its shape.
        client_dp = _field(header, "client_dp", dict, None)
        if min_peers < 1 or not 0 < weightage <= 100:
            raise Refusal("invalid", f"join: min_peers {min_peers} must be >= 1 and weightage {weightage} in (0, 100]")
        try:
            joined = self.node.join(contract, min_peers, float(weightage), merge_method, client_dp)
        except SwarmError as exc:  # refused by the ledger, SN unreachable, or this SL is stopping
            raise Refusal("refused", str(exc)) from None
        return {"ok": True, "node_id": self.node.node_id, **joined}

    def _sync(self, header: dict, blob: bytes) -> tuple[dict, bytes]:
        engine = self._engine()
        weight = float(_field(header, "weight", (int, float), 0.0))
        if not math.isfinite(weight) or weight < 0:
            raise Refusal("invalid", f"sync: weight {weight} must be a finite number >= 0")
        try:
            if _field(header, "catch_up", bool, False):
                result = engine.catch_up() or engine.sync(blob, weight)
            elif _field(header, "final", bool, False):
                result = engine.sync_final(blob, weight)
            else:
                result = engine.sync(blob, weight)
        except SwarmError as exc:
            log.error("sync failed: %s", exc)
            raise Refusal("refused", str(exc)) from None
        return {"ok": True, "round": result.round, "hash": result.hash, "participants": list(result.participants),
                "leader": result.leader, "seconds": result.seconds, "swarm_finished": result.swarm_finished,
                "contributed": result.contributed, **engine.client_privacy()}, result.blob

    def _report(self, header: dict) -> None:
        engine = self._engine()
        kind = _field(header, "kind", str, "train") or "train"
        if kind not in ("train", "validation"):
            raise Refusal("invalid", f"metrics kind {kind[:40]!r} is neither train nor validation")
        unknown = set(header) - {"op", "kind", "round", "step", "metric_name", *REPORT_NUMBERS}
        if unknown:
            raise Refusal("invalid", f"report: unknown field {sorted(unknown)[0][:40]!r}")
        # A diverged model reports NaN or Inf; JSON (and so the ledger) has no such numbers: null.
        # What the ML did not send is unknown, also null.
        values = {name: _finite(header, name) for name in REPORT_NUMBERS}
        payload = {"contract": engine.contract_name, "node": self.node.node_id, "kind": kind,
                   "round": _field(header, "round", int, 0), "step": _field(header, "step", int, 0),
                   "epoch": values["epoch"], "loss": values["loss"]}
        payload.update({name: values[name] for name in OPTIONAL_NUMBERS if values[name] is not None})
        if kind == "validation" or values["metric"] is not None:
            payload.update(metric=values["metric"], metric_name=_field(header, "metric_name", str, "") or "metric")
        try:
            self.node.sn.submit("metrics", payload)
        except SwarmError as exc:
            log.warning("metrics not recorded: %s", exc)

    def _engine(self):
        engine = self.node.only_engine()
        if engine is None:
            raise Refusal("refused", "join a contract first (SwarmCallback does this)")
        return engine


def _field(header: dict, name: str, kind, default):
    value = header.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise Refusal("invalid", f"{header.get('op')}: field {name!r} is {type(value).__name__}, not "
                                 f"{getattr(kind, '__name__', 'a number')}")
    return value


def _finite(header: dict, name: str) -> float | None:
    value = _field(header, name, (int, float), None)
    return float(value) if value is not None and math.isfinite(value) else None


def _refuse(conn: socket.socket, code: str, message: str) -> None:
    """Tells the caller why it is turned away (if it still listens) and closes the connection."""
    try:
        frames.send(conn, {"ok": False, "code": code, "error": message})
    except (OSError, frames.FrameError):
        pass
    finally:
        try:
            conn.close()
        except OSError:
            pass
