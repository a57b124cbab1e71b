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
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from swarmlearn.defaults import CHUNK, MAX_MESSAGE, TOKEN_ENV, TOKEN_METADATA
from swarmlearn.errors import ConfigError, SwarmError
from swarmlearn.merge import METHODS

FINAL_MESSAGE = "All peers and Swarm training rounds finished. Final Swarm model was loaded."

# Where the ML writes its metrics as TensorBoard event files, one run folder per node (`swarm run
# --tensorboard DIR` sets it for every node; the SWOP passes its environment on).
TENSORBOARD_ENV = "SWARM_TENSORBOARD_DIR"

# The original product's keyword names, accepted so that existing model.py files run unchanged. Its
# adaptive-sync validation set is the validation data here: the merged model is measured on it.
CAMEL_CASE = {"syncFrequency": "sync_frequency", "minPeers": "min_peers", "trainingContract": "training_contract",
              "nodeWeightage": "node_weightage", "mergeMethod": "merge_method", "totalEpochs": "total_epochs",
              "useAdaptiveSync": None, "adsValData": "val_data", "adsValBatchSize": "val_batch_size",
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
    # Validation of each merged model: a callable taking the model and returning {name: value} (its
    # first name other than "loss" is the metric), or data the framework's callback measures.
    validate: Callable[[object], dict] | None = None
    val_data: object = None
    val_batch_size: int | None = None
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
        if self.validate is not None and not callable(self.validate):
            raise ConfigError(f"validate must be a function of the model returning {{name: value}}, got "
                              f"{type(self.validate).__name__}")
        if self.val_batch_size is not None and (not isinstance(self.val_batch_size, int) or self.val_batch_size < 1):
            raise ConfigError(f"val_batch_size must be a whole number >= 1, got {self.val_batch_size!r}")
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

    def report(self, kind: str, round_no: int, step: int, metric_name: str = "", **values: float | None) -> None:
        """Records a metrics entry of `kind` ("train" or "validation"); values given as None are
        unknown and left unset."""
        known = {k: float(v) for k, v in values.items() if v is not None}
        self._call(self._stub.Report, self.pb.MetricsRequest(kind=kind, round=round_no, step=step,
                                                             metric_name=metric_name, **known))

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=60, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise SwarmError(f"SL refused {type(request).__name__}: {exc.details() or exc.code().name}") from None


class MeanLoss:
    """The mean training loss of the steps since the last sync. Each report covers `steps` steps: one
    batch, or a Trainer log line that already averages several."""

    def __init__(self) -> None:
        self.total = 0.0
        self.steps = 0

    def add(self, loss: float, steps: int = 1) -> None:
        self.total += float(loss) * steps
        self.steps += steps

    def take(self) -> float | None:
        """The mean so far (None when no loss was reported), then starts afresh."""
        mean = self.total / self.steps if self.steps else None
        self.total, self.steps = 0.0, 0
        return mean


class TensorBoardLog:
    """A node's metrics as TensorBoard scalars by step (train/loss, validation/<metric>,
    validation/loss) in ROOT/<node>; tensorboardX is imported only when this is asked for."""

    def __init__(self, root: str, node_id: str):
        from tensorboardX import SummaryWriter

        self.folder = os.path.join(root, node_id)
        self._writer = SummaryWriter(logdir=self.folder)

    def scalar(self, tag: str, value: float | None, step: int) -> None:
        if value is not None:
            self._writer.add_scalar(tag, value, step)
            self._writer.flush()  # a reader (TensorBoard) sees each point as it comes

    def close(self) -> None:
        self._writer.close()


def validation_values(values) -> tuple[str, float | None, float | None]:
    """(metric name, metric, loss) of a validation's {name: value}: the metric is its first value
    not named "loss" (the loss itself where there is no other)."""
    if not isinstance(values, dict) or not values:
        raise ConfigError(f"validation must return {{name: value}}, e.g. {{'accuracy': 0.9, 'loss': 0.3}}; "
                          f"got {values!r}")
    name = next((k for k in values if k != "loss"), "loss")
    return str(name), _number(name, values[name]), _number("loss", values.get("loss"))


def _number(name: str, value) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"validation value {name!r} is {value!r}, not a number") from None


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
        self.epoch: float | None = None
        self.train_loss = MeanLoss()
        # Set where the loss of the steps up to a sync is known only after it (the Trainer logs it
        # then): the train entry waits for report_train().
        self.loss_after_sync = False
        self.finished = False
        self.node_id = os.environ.get("NODE_ID", "")
        self._train_due: tuple[int, int, float | None] | None = None
        self._sl: SLChannel | None = None
        self._tensorboard: TensorBoardLog | None = None

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
        if os.environ.get(TENSORBOARD_ENV):
            self._tensorboard = TensorBoardLog(os.environ[TENSORBOARD_ENV], self.node_id)
            self.log.info("%s writes its metrics for TensorBoard to %s", self.node_id, self._tensorboard.folder)
        # Everyone starts from the same model: a fresh swarm merges the initial weights, a late
        # node takes the latest merged model.
        self.sync(catch_up=True)

    def step(self, samples: int, last: bool = False) -> None:
        """Counts one optimizer step; syncs every sync_frequency steps, or makes the node's final
        contribution when the caller knows this was its `last` step."""
        self.total_steps += 1
        self.steps_since_sync += 1
        self.samples_since_sync += samples
        if last:
            self.finish()
        elif not self.loopback and self.steps_since_sync >= self.settings.sync_frequency:
            self.sync()

    def add_loss(self, loss: float | None, steps: int = 1) -> None:
        if loss is not None:
            self.train_loss.add(loss, steps)

    def finish(self) -> None:
        """The node's final contribution (none when `inactive`): returns once every peer has
        finished, with the swarm's final merged model loaded."""
        if self.loopback or self.finished:
            return
        self.finished = True
        if self.settings.checkin_model_on_train_end == "inactive":
            self.log.info("training ended; %s leaves the swarm without a final contribution", self.node_id)
        else:
            self.sync(final=True)

    def end(self) -> None:
        if self.loopback:
            return
        self.finish()
        self.report_train()
        self.log.info(FINAL_MESSAGE)
        print(FINAL_MESSAGE, flush=True)
        if self._sl is not None:
            self._sl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    # ---------------------------------------------------------------------------- a sync

    def sync(self, final: bool = False, catch_up: bool = False) -> None:
        from safetensors.torch import load, save

        started = time.monotonic()
        trained = self.steps_since_sync > 0
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
        if not catch_up:
            self._merged(h.round, trained)

    def _merged(self, round_no: int, trained: bool) -> None:
        """What a sync after training records: the loss of the steps before it, and where there is
        validation, the metric of the merged model just loaded. Both are tagged with its round."""
        self.report_train()  # one still waiting for its loss, if the Trainer never logged it
        if trained:
            self._train_due = (round_no, self.total_steps, self.epoch)
            if not self.loss_after_sync:
                self.report_train()
        if self.settings.validate is not None:
            self.report_validation(round_no, self.settings.validate(self.model))

    # ---------------------------------------------------------------------------- metrics

    def report_train(self) -> None:
        """Records the train entry of the last sync after training: the mean loss of its steps."""
        if self._train_due is None:
            return
        round_no, step, epoch = self._train_due
        self._train_due = None
        loss = self.train_loss.take()
        self.log.info("round %d: %s at step %d, mean training loss since its last sync %s", round_no, self.node_id,
                      step, "unknown" if loss is None else f"{loss:.4f}")
        self._record("train", round_no, step, epoch=epoch, loss=loss)
        if self._tensorboard is not None:
            self._tensorboard.scalar("train/loss", loss, step)

    def report_validation(self, round_no: int, values: dict) -> None:
        """Records the merged model of `round_no` measured on this node's validation data."""
        name, metric, loss = validation_values(values)
        self.log.info("round %d: %s measures the merged model: %s %s%s", round_no, self.node_id, name, metric,
                      "" if loss is None else f", loss {loss:.4f}")
        self._record("validation", round_no, self.total_steps, name, epoch=self.epoch, metric=metric, loss=loss)
        if self._tensorboard is not None:
            self._tensorboard.scalar(f"validation/{name}", metric, self.total_steps)
            if name != "loss":
                self._tensorboard.scalar("validation/loss", loss, self.total_steps)

    def _record(self, kind: str, round_no: int, step: int, metric_name: str = "", **values: float | None) -> None:
        # A diverged model's NaN is recorded (the SL writes it as null): it is news, not an error.
        try:
            self._sl.report(kind, round_no, step, metric_name, **values)
        except SwarmError as exc:
            self.log.warning("round %d: %s metrics of %s not recorded: %s", round_no, kind, self.node_id, exc)
