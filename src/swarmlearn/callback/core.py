"""What both SwarmCallbacks share: the conversation with this node's SL, and moving the model's
tensors in and out as safetensors bytes.

For a PEFT model only the trainable tensors travel (adapters and the `modules_to_save` head), read
and written with PEFT's own state-dict functions, so the names match on every node and loading the
merged tensors changes exactly those. Loading copies into the existing parameters, so the optimizer
and scheduler keep working across rounds.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field

import grpc

from swarmlearn.defaults import CHUNK, MAX_MESSAGE, TOKEN_ENV, TOKEN_METADATA
from swarmlearn.errors import ConfigError, SwarmError
from swarmlearn.merge import METHODS

FINAL_MESSAGE = "All peers and Swarm training rounds finished. Final Swarm model was loaded."

# The original product's keyword names, accepted so that existing model.py files run unchanged.
CAMEL_CASE = {"syncFrequency": "sync_frequency", "minPeers": "min_peers", "trainingContract": "training_contract",
              "nodeWeightage": "node_weightage", "mergeMethod": "merge_method", "totalEpochs": "total_epochs",
              "useAdaptiveSync": None, "adsValData": None, "adsValBatchSize": None,
              "checkinModelOnTrainEnd": "checkin_model_on_train_end", "hfMode": "hf_mode"}


def loopback_enabled() -> bool:
    return os.environ.get("SWARM_LOOPBACK", "").strip().lower() in ("1", "true", "yes", "on")


def normalize_kwargs(kwargs: dict) -> dict:
    out = {}
    for key, value in kwargs.items():
        if key in CAMEL_CASE:
            if CAMEL_CASE[key] is None:
                continue  # adaptive sync is not implemented; a fixed sync_frequency is used
            key = CAMEL_CASE[key]
        out[key] = value
    return out


@dataclass
class SwarmSettings:
    sync_frequency: int = 16
    min_peers: int = 2
    training_contract: str = "default"
    node_weightage: float = 1
    merge_method: str = "mean"
    total_epochs: int | None = None
    adapters_only: bool | None = None
    checkin_model_on_train_end: str = "snapshot"
    hf_mode: str | None = None
    logger: logging.Logger | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.sync_frequency, int) or self.sync_frequency < 1:
            raise ConfigError(f"sync_frequency must be a whole number of steps >= 1, got {self.sync_frequency!r}")
        if not isinstance(self.min_peers, int) or self.min_peers < 1:
            raise ConfigError(f"min_peers must be a whole number >= 1, got {self.min_peers!r}")
        if not 0 < float(self.node_weightage) <= 100:
            raise ConfigError(f"node_weightage must be in (0, 100], got {self.node_weightage!r}")
        if self.merge_method not in METHODS:
            raise ConfigError(f"merge_method {self.merge_method!r} is not one of {', '.join(METHODS)}")
        if self.checkin_model_on_train_end not in ("snapshot", "inactive", "active"):
            raise ConfigError("checkin_model_on_train_end must be snapshot, inactive or active")
        if self.hf_mode is not None and self.adapters_only is None:
            self.adapters_only = self.hf_mode == "peft"


def _is_peft(model) -> bool:
    # A PeftModel can only exist once peft is imported; importing it here just to ask would cost
    # seconds (it pulls in transformers).
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def model_tensors(model, adapters_only: bool | None) -> dict:
    """The tensors this node contributes, by name, detached copies on the CPU."""
    if _is_peft(model) and adapters_only is not False:
        from peft import get_peft_model_state_dict

        tensors = get_peft_model_state_dict(model)
    elif adapters_only:
        tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    else:
        tensors = model.state_dict()
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}


def load_tensors(model, tensors: dict, adapters_only: bool | None) -> None:
    """Copies merged tensors into the model's own parameters (same device and dtype as before)."""
    if _is_peft(model) and adapters_only is not False:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, tensors)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise SwarmError(f"merged model has tensors this model lacks, e.g. {unexpected[0]}")
    else:
        missing, unexpected = model.load_state_dict(tensors, strict=not adapters_only)
        if unexpected:
            raise SwarmError(f"merged model has tensors this model lacks, e.g. {unexpected[0]}")


class SLChannel:
    """The ML side of the local channel to this node's SL: join, sync blobs, report metrics. Knows
    nothing of torch, so stand-ins (benchmarks, other frameworks) can use it too."""

    def __init__(self, address: str, ready_timeout: float = 30.0, token: str | None = None):
        from swarmlearn.proto import sl_pb2, sl_pb2_grpc

        self.address = address
        self.pb = sl_pb2
        # An SL serving its ML on TCP wants its secret with every call (SWARM_SL_TOKEN, from its ready line).
        token = os.environ.get(TOKEN_ENV) if token is None else token
        self._metadata = ((TOKEN_METADATA, token),) if token else None
        self._channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                                                ("grpc.max_send_message_length", MAX_MESSAGE)])
        self._stub = sl_pb2_grpc.SwarmLocalStub(self._channel)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=ready_timeout)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise SwarmError(f"no SL answers at SWARM_SL_ADDR={address}; is `swarm sl` running?") from None

    def join(self, contract: str, min_peers: int, weightage: float, merge_method: str):
        return self._call(self._stub.Join, self.pb.JoinRequest(contract=contract, min_peers=min_peers,
                                                                weightage=weightage, merge_method=merge_method))

    def sync(self, blob: bytes, weight: float, final: bool = False, catch_up: bool = False):
        """Sends our tensors; returns (reply header, merged blob) once the round is over."""
        header = self.pb.SyncHeader(weight=weight, size=len(blob), final=final, catch_up=catch_up)

        def parts():
            yield self.pb.SyncPart(header=header)
            for start in range(0, len(blob), CHUNK):
                yield self.pb.SyncPart(data=blob[start:start + CHUNK])

        reply, chunks = None, []
        try:
            for part in self._stub.Sync(parts(), metadata=self._metadata):
                if part.HasField("header"):
                    reply = part.header
                else:
                    chunks.append(part.data)
        except grpc.RpcError as exc:
            raise SwarmError(f"sync with SL failed: {exc.details() or exc.code().name}") from None
        return reply, b"".join(chunks)

    def report(self, round_no: int, step: int, metric_name: str, **values: float) -> None:
        self._call(self._stub.Report, self.pb.MetricsRequest(round=round_no, step=step, metric_name=metric_name,
                                                             **values))

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=60, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise SwarmError(f"SL refused {type(request).__name__}: {exc.details() or exc.code().name}") from None


class SwarmCore:
    def __init__(self, model, **kwargs):
        self.model = model
        self.settings = SwarmSettings(**normalize_kwargs(kwargs))
        self.log = self.settings.logger or logging.getLogger("swarmlearn.ml")
        self.loopback = loopback_enabled()
        self.steps_since_sync = 0
        self.samples_since_sync = 0
        self.total_steps = 0
        self.rounds = 0
        self.last_round = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last: dict[str, float] = {}
        self.node_id = os.environ.get("NODE_ID", "")
        self._sl: SLChannel | None = None

    # ---------------------------------------------------------------------------- lifecycle

    def begin(self) -> None:
        if self.loopback:
            self.log.info("SWARM_LOOPBACK is set: training alone, every swarm call is a no-op")
            return
        address = os.environ.get("SWARM_SL_ADDR")
        if not address:
            raise ConfigError("SWARM_SL_ADDR is not set: run model.py through `swarm run`/`swarm swop`, or start "
                              "`swarm sl` and export the SWARM_SL_ADDR it prints; SWARM_LOOPBACK=1 trains alone")
        self._sl = SLChannel(address)
        reply = self._sl.join(self.settings.training_contract, self.settings.min_peers,
                              float(self.settings.node_weightage), self.settings.merge_method)
        self.node_id = reply.node_id
        self.log.info("%s joined the swarm on contract %s (latest merged round %d)", reply.node_id, reply.contract,
                      reply.latest_merged_round)
        # Everyone starts from the same model: a fresh swarm merges the initial weights, a late
        # node takes the latest merged model.
        self.sync(catch_up=True)

    def step(self, samples: int) -> None:
        self.total_steps += 1
        self.steps_since_sync += 1
        self.samples_since_sync += samples
        if not self.loopback and self.steps_since_sync >= self.settings.sync_frequency:
            self.sync()

    def end(self) -> None:
        if self.loopback:
            return
        if self.settings.checkin_model_on_train_end == "inactive":
            self.log.info("training ended; %s leaves the swarm without a final contribution", self.node_id)
        else:
            self.sync(final=True)
        self.log.info(FINAL_MESSAGE)
        print(FINAL_MESSAGE, flush=True)
        if self._sl is not None:
            self._sl.close()

    def report(self, **metrics: float) -> None:
        self.last.update({k: float(v) for k, v in metrics.items() if v is not None})

    # ---------------------------------------------------------------------------- a sync

    def sync(self, final: bool = False, catch_up: bool = False) -> None:
        from safetensors.torch import load, save

        started = time.monotonic()
        blob = save(model_tensors(self.model, self.settings.adapters_only))
        weight = float(self.settings.node_weightage) * self.samples_since_sync
        h, merged = self._sl.sync(blob, weight, final=final, catch_up=catch_up)
        load_tensors(self.model, load(merged), self.settings.adapters_only)
        self.bytes_sent += len(blob)
        self.bytes_received += len(merged)
        self.rounds += 1
        self.last_round = h.round
        self.steps_since_sync = 0
        self.samples_since_sync = 0
        self.log.info("round %d: %s model %s from %d peers (leader %s) loaded after %.2f s, %.1f KB each way",
                      h.round, "merged" if h.contributed else "latest merged", h.hash[:12], len(h.participants),
                      h.leader, time.monotonic() - started, len(blob) / 1024)
        if self.last:
            self._report_metrics(h.round)

    def _report_metrics(self, round_no: int) -> None:
        m = self.last
        self._sl.report(round_no, self.total_steps, str(self.settings.extra.get("metric_name", "metric")),
                        loss=m.get("loss", 0.0), metric=m.get("metric", 0.0), epoch=m.get("epoch", 0.0))
