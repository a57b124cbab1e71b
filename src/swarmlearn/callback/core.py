"""What every SwarmCallback shares: the conversation with this node's SL, and moving the model's
tensors in and out as safetensors bytes.

The channel to the SL (SLChannel) is framed JSON and raw bytes over a local socket
(callback/frames.py), and tensors are encoded by swarmlearn.tensors with numpy alone: the ML side
needs neither gRPC, nor protobuf, nor the safetensors package, so it runs in the environments the
original product's examples pin (protobuf 3.15.6, old numpy).

For a PEFT model only the trainable tensors travel (adapters and the `modules_to_save` head), read
and written with PEFT's own state-dict functions, so the names match on every node and loading the
merged tensors changes exactly those. Loading copies into the existing parameters, so the optimizer
and scheduler keep working across rounds.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field

from swarmlearn.callback import frames
from swarmlearn.callback.adaptive import AdaptiveSync
from swarmlearn.callback.original_env import describe as describe_sl_environment
from swarmlearn.callback.settings import CAMEL_CASE, SwarmSettings, settings_from
from swarmlearn.defaults import TOKEN_ENV
from swarmlearn.errors import ConfigError, SwarmError

__all__ = ["CAMEL_CASE", "FINAL_MESSAGE", "SLChannel", "SwarmCore", "SwarmSettings", "TorchWeights"]

FINAL_MESSAGE = "All peers and Swarm training rounds finished. Final Swarm model was loaded."

# Where the ML writes its metrics as TensorBoard event files, one run folder per node (`swarm run
# --tensorboard DIR` sets it for every node; the SWOP passes its environment on).
TENSORBOARD_ENV = "SWARM_TENSORBOARD_DIR"
# How long join and report may take before the SL counts as gone (a sync waits for its round).
CALL_TIMEOUT = 60.0


def loopback_enabled() -> bool:
    return os.environ.get("SWARM_LOOPBACK", "").strip().lower() in ("1", "true", "yes", "on")


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


def torch_to_blob(tensors: dict) -> bytes:
    """torch tensors as safetensors bytes (bfloat16 carried as its raw 16-bit patterns)."""
    import numpy as np
    import torch

    from swarmlearn.tensors import Tensor, encode, tensor

    out = {}
    for name, t in tensors.items():
        if t.dtype == torch.bfloat16:
            out[name] = Tensor("BF16", t.view(torch.int16).numpy().view(np.uint16))
        else:
            out[name] = tensor(t.numpy())
    return encode(out)


def blob_to_torch(blob: bytes) -> dict:
    import numpy as np
    import torch

    from swarmlearn.tensors import decode

    out = {}
    for name, t in decode(blob).items():
        if t.dtype == "BF16":
            out[name] = torch.from_numpy(t.array.view(np.int16).copy()).view(torch.bfloat16)
        else:
            out[name] = torch.from_numpy(t.array.copy())
    return out


class TorchWeights:
    """A torch model's tensors in and out (whole state dict, trainable only, or PEFT adapters)."""

    def __init__(self, model, adapters_only: bool | None):
        self.model = model
        self.adapters_only = adapters_only

    def blob(self) -> bytes:
        return torch_to_blob(model_tensors(self.model, self.adapters_only))

    def load(self, blob: bytes) -> None:
        load_tensors(self.model, blob_to_torch(blob), self.adapters_only)


@dataclass(frozen=True)
class Joined:
    node_id: str
    contract: str
    latest_merged_round: int
    merge_method: str = ""  # the contract's, which may be another than the callback asked for (none)
    contract_seed: str = ""  # hex: swarmlearn.lora.contract_seed, for ffa_lora's frozen A


@dataclass(frozen=True)
class Merged:
    """The SL's answer to a sync: the round merged, its merged hash, who took part and led, how long
    it took, whether it was the swarm's last, and whether our tensors were part of it; under client-level
    DP, what our contributions have spent so far (ε at δ, over how many rounds)."""

    round: int
    hash: str
    participants: list = field(default_factory=list)
    leader: str = ""
    seconds: float = 0.0
    swarm_finished: bool = False
    contributed: bool = False
    client_rounds: int | None = None
    client_noise_multiplier: float | None = None
    client_delta: float | None = None


class SLChannel:
    """The ML side of the local channel to this node's SL: join, sync blobs, report metrics. Knows
    nothing of torch, so stand-ins (benchmarks, other frameworks) can use it too. One connection,
    one request at a time."""

    def __init__(self, address: str, ready_timeout: float = 30.0, token: str | None = None):
        self.address = address
        # An SL serving its ML on TCP wants its secret (SWARM_SL_TOKEN, from its ready line).
        token = os.environ.get(TOKEN_ENV) if token is None else token
        self._sock = _connect_when_ready(address, ready_timeout)
        try:
            reply = self._call({"op": "hello", "protocol": frames.PROTOCOL, "token": token or ""}, CALL_TIMEOUT)
        except SwarmError:
            self._sock.close()
            raise
        self.node_id = reply.get("node_id", "")

    def join(self, contract: str, min_peers: int, weightage: float, merge_method: str,
             client_dp: dict | None = None) -> Joined:
        reply = self._call({"op": "join", "contract": contract, "min_peers": min_peers, "weightage": weightage,
                            "merge_method": merge_method, **({"client_dp": client_dp} if client_dp else {})},
                           CALL_TIMEOUT)
        return Joined(str(reply.get("node_id", "")), str(reply.get("contract", "")),
                      int(reply.get("latest_merged_round") or 0), str(reply.get("merge_method") or merge_method),
                      str(reply.get("contract_seed") or ""))

    def sync(self, blob: bytes, weight: float, final: bool = False, catch_up: bool = False) -> tuple[Merged, bytes]:
        """Sends our tensors; returns (what the SL says of the round, merged blob) once it is over."""
        try:
            self._sock.settimeout(None)  # a round waits for its peers as long as the SL does
            frames.send_blob(self._sock, {"op": "sync", "weight": weight, "final": final, "catch_up": catch_up}, blob)
            header, first = frames.receive(self._sock)
            _raise_refusal("sync", header)
            merged = frames.receive_blob(self._sock, header, first)
        except (OSError, frames.FrameError) as exc:
            raise SwarmError(f"sync with SL failed: {_lost(exc)}") from None
        fields = {k: header[k] for k in Merged.__dataclass_fields__ if k in header}
        return Merged(**fields), merged

    def report(self, kind: str, round_no: int, step: int, metric_name: str = "", **values: float | None) -> None:
        """Records a metrics entry of `kind` ("train" or "validation"); values given as None are
        unknown and left unset."""
        known = {k: float(v) for k, v in values.items() if v is not None}
        self._call({"op": "report", "kind": kind, "round": round_no, "step": step, "metric_name": metric_name,
                    **known}, CALL_TIMEOUT)

    def close(self) -> None:
        self._sock.close()

    def _call(self, request: dict, timeout: float) -> dict:
        try:
            self._sock.settimeout(timeout)
            frames.send(self._sock, request)
            reply, _ = frames.receive(self._sock)
        except (OSError, frames.FrameError) as exc:
            raise SwarmError(f"SL did not answer {request['op']}: {_lost(exc)}") from None
        _raise_refusal(request["op"], reply)
        return reply


def _connect_when_ready(address: str, timeout: float) -> socket.socket:
    """Connects, retrying while the SL is not listening yet (it prints its address once it is)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return frames.connect(address, timeout=max(0.1, deadline - time.monotonic()))
        except (ConnectionRefusedError, FileNotFoundError, socket.timeout) as exc:
            if time.monotonic() >= deadline:
                raise SwarmError(f"no SL answers at SWARM_SL_ADDR={address} ({_lost(exc)}); is `swarm sl` "
                                 f"running?") from None
            time.sleep(0.1)
        except OSError as exc:
            raise SwarmError(f"cannot reach the SL at SWARM_SL_ADDR={address}: {_lost(exc)}") from None


def _raise_refusal(op: str, reply: dict) -> None:
    if reply.get("ok") is not True:
        raise SwarmError(f"SL refused {op}: {str(reply.get('error') or 'no reason given')[:500]}")


def _lost(exc: Exception) -> str:
    return str(exc) if isinstance(exc, frames.FrameError) else (getattr(exc, "strerror", None) or type(exc).__name__)


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
    """The swarm side of a SwarmCallback, whatever the framework: `weights` moves the model's tensors
    in and out (TorchWeights for a torch model unless the callback gives another)."""

    def __init__(self, model, weights=None, default_logger: str = "swarmlearn.ml", privacy=None, **kwargs):
        self.model = model
        # What this node's training has spent of its privacy budget (swarmlearn.dp.PrivacyAccount, or
        # anything with epsilon(), delta and describe()): recorded with every train entry.
        self.privacy = privacy
        self.settings = settings_from(kwargs)
        self.log = self.settings.logger or logging.getLogger(default_logger)
        self.loopback = loopback_enabled()
        self._weights = weights
        self.sync_interval = self.settings.sync_frequency
        self.adaptive = AdaptiveSync(self.settings.sync_frequency) if self.settings.adaptive_sync else None
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
        self.swarm_finished = False
        self.node_id = os.environ.get("NODE_ID", "")
        self._train_due: tuple[int, int, float | None] | None = None
        self._sl: SLChannel | None = None
        self._tensorboard: TensorBoardLog | None = None
        # The method the contract merges with (the SL says at join), and the optimizer whose moments of
        # LoRA factors lora_exact re-factored are cleared (the callback sets it; without, they are kept).
        self.merge_method = self.settings.merge_method or "mean"
        self.client_privacy: dict | None = None  # {"client_epsilon", "client_delta"} under client-level DP
        self.optimizer = None
        self._moments_kept_said = False

    @property
    def weights(self):
        if self._weights is None:
            self._weights = TorchWeights(self.model, self.settings.adapters_only)
        return self._weights

    # ---------------------------------------------------------------------------- lifecycle

    def begin(self) -> None:
        note = describe_sl_environment(os.environ)
        if note:
            self.log.info(note)
        if self.loopback:
            self.log.info("SWARM_LOOPBACK is set: training alone, every swarm call is a no-op")
            return
        address = os.environ.get("SWARM_SL_ADDR")
        if not address:
            raise ConfigError("SWARM_SL_ADDR is not set: run model.py through `swarm run`/`swarm swop`, or start "
                              "`swarm sl` and export the SWARM_SL_ADDR it prints; SWARM_LOOPBACK=1 trains alone")
        self._sl = SLChannel(address)
        reply = self._sl.join(self.settings.training_contract, self.settings.min_peers,
                              float(self.settings.node_weightage), self.settings.merge_method or "",
                              self.settings.client_dp)
        self.node_id = reply.node_id
        self.log.info("%s joined the swarm on contract %s (latest merged round %d)", reply.node_id, reply.contract,
                      reply.latest_merged_round)
        if os.environ.get(TENSORBOARD_ENV):
            self._tensorboard = TensorBoardLog(os.environ[TENSORBOARD_ENV], self.node_id)
            self.log.info("%s writes its metrics for TensorBoard to %s", self.node_id, self._tensorboard.folder)
        self.merge_method = reply.merge_method or self.merge_method
        if self.merge_method == "ffa_lora":
            self._freeze_lora_a(reply.contract_seed)
        # Everyone starts from the same model: a fresh swarm merges the initial weights, a late
        # node takes the latest merged model.
        self.sync(catch_up=True)

    def step(self, samples: int, last: bool = False) -> None:
        """Counts one optimizer step; syncs every sync interval (syncFrequency, or what adaptive sync
        made of it), or makes the node's final contribution when the caller knows this was its
        `last` step."""
        self.total_steps += 1
        self.steps_since_sync += 1
        self.samples_since_sync += samples
        if last:
            self.finish()
        elif not self.loopback and not self.finished and self.steps_since_sync >= self.sync_interval:
            self.sync()

    def track_privacy(self, account) -> None:
        """Records ε spent (at its δ) from `account` with every train entry from now on."""
        self.privacy = account

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
        if self.privacy is not None:
            self.log.info("%s trained with %s", self.node_id, self.privacy.describe())
        self.log.info(FINAL_MESSAGE)
        print(FINAL_MESSAGE, flush=True)
        if self._sl is not None:
            self._sl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    # ---------------------------------------------------------------------------- a sync

    def sync(self, final: bool = False, catch_up: bool = False) -> None:
        started = time.monotonic()
        trained = self.steps_since_sync > 0
        blob = self.weights.blob()
        weight = float(self.settings.node_weightage) * self.samples_since_sync
        h, merged = self._sl.sync(blob, weight, final=final, catch_up=catch_up)
        self.weights.load(merged)
        if self.merge_method == "lora_exact":
            self._reset_refactored(blob, merged)
        if h.client_rounds is not None:
            self._client_spent(h)
        self.bytes_sent += len(blob)
        self.bytes_received += len(merged)
        self.rounds += 1
        self.last_round = h.round
        self.swarm_finished = h.swarm_finished
        self.steps_since_sync = 0
        self.samples_since_sync = 0
        self.log.info("round %d: %s model %s from %d peers (leader %s) loaded after %.2f s, %.1f KB each way",
                      h.round, "merged" if h.contributed else "latest merged", h.hash[:12], len(h.participants),
                      h.leader, time.monotonic() - started, len(blob) / 1024)
        if not catch_up:
            self._merged(h.round, trained)

    def _client_spent(self, h: Merged) -> None:
        """Client-level DP (secure_mean): ε at δ that this node's noised contributions, as its SL counts
        them, have spent, by the accountant of swarmlearn.dp (Opacus's)."""
        from swarmlearn.dp import client_epsilon

        try:
            epsilon = client_epsilon(h.client_noise_multiplier, h.client_rounds, h.client_delta)
        except ImportError:
            self.log.warning("client-level DP: ε is computed with Opacus's accountant; install swarmlearn[dp] here")
            return
        self.client_privacy = {"client_epsilon": epsilon, "client_delta": h.client_delta}
        self.log.info("round %d: %s has spent client-level ε=%.3g at δ=%g over %d noised contributions", h.round,
                      self.node_id, epsilon, h.client_delta, h.client_rounds)

    def _freeze_lora_a(self, seed_hex: str) -> None:
        """ffa_lora: every LoRA A of the model set to the contract's frozen values and no longer trained."""
        from swarmlearn.lora import freeze_lora_a

        if not seed_hex:
            raise SwarmError("merge method ffa_lora needs the contract's seed, and this node's SL sent none: "
                             "update its swarmlearn")
        frozen = freeze_lora_a(self.model, bytes.fromhex(seed_hex))
        if not frozen:
            raise ConfigError("merge_method ffa_lora freezes the LoRA A factors of a PEFT model, and this model "
                              "has none: use get_peft_model with a LoraConfig, or another merge_method")
        self.log.info("%s froze the A of its %d LoRA modules at the contract's values (ffa_lora): B trains",
                      self.node_id, frozen)

    def _reset_refactored(self, sent: bytes, merged: bytes) -> None:
        """lora_exact: the optimizer's moments of the LoRA factors that came back re-factored (a new
        basis, in which they mean nothing) are cleared."""
        from swarmlearn.lora import lora_parameters, refactored_modules, reset_moments
        from swarmlearn.tensors import decode

        modules = refactored_modules(decode(sent), decode(merged))
        if not modules:
            return
        if self.optimizer is None:
            if not self._moments_kept_said:
                self.log.info("lora_exact re-factored %d LoRA modules; the callback was given no optimizer=, so "
                              "its moments for them are kept (pass it to reset them)", len(modules))
                self._moments_kept_said = True
            return
        cleared = reset_moments(self.optimizer, lora_parameters(self.model, modules))
        self.log.info("%s reset the optimizer's moments of %d LoRA factors that lora_exact re-factored", self.node_id,
                      cleared)

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
        total = self.settings.total_epochs
        progress = f", epoch {epoch:g} of {total} ({min(100.0, 100 * epoch / total):.0f}%)" \
            if total and epoch is not None else ""
        self.log.info("round %d: %s at step %d%s, mean training loss since its last sync %s", round_no, self.node_id,
                      step, progress, "unknown" if loss is None else f"{loss:.4f}")
        spent = {}
        if self.privacy is not None:
            spent = {"epsilon": self.privacy.epsilon(), "delta": self.privacy.delta}
            self.log.info("round %d: %s has spent ε=%.3g at δ=%g", round_no, self.node_id, spent["epsilon"],
                          spent["delta"])
        if self.client_privacy is not None:
            spent.update(self.client_privacy)
        self._record("train", round_no, step, epoch=epoch, loss=loss, total_epochs=total, **spent)
        if self._tensorboard is not None:
            self._tensorboard.scalar("train/loss", loss, step)
            self._tensorboard.scalar("privacy/epsilon", spent.get("epsilon"), step)

    def report_validation(self, round_no: int, values: dict) -> None:
        """Records the merged model of `round_no` measured on this node's validation data; with
        adaptive sync, its loss sets the interval to the next sync."""
        name, metric, loss = validation_values(values)
        self.log.info("round %d: %s measures the merged model: %s %s%s", round_no, self.node_id, name, metric,
                      "" if loss is None else f", loss {loss:.4f}")
        self._record("validation", round_no, self.total_steps, name, epoch=self.epoch, metric=metric, loss=loss,
                     total_epochs=self.settings.total_epochs)
        if self._tensorboard is not None:
            self._tensorboard.scalar(f"validation/{name}", metric, self.total_steps)
            if name != "loss":
                self._tensorboard.scalar("validation/loss", loss, self.total_steps)
        if self.adaptive is not None:
            before, self.sync_interval = self.sync_interval, self.adaptive.after_merge(loss)
            if self.sync_interval != before:
                self.log.info("round %d: adaptive sync: validation loss %s, next sync after %d steps (was %d)",
                              round_no, "unknown" if loss is None else f"{loss:.4f}", self.sync_interval, before)

    def _record(self, kind: str, round_no: int, step: int, metric_name: str = "", **values: float | None) -> None:
        # A diverged model's NaN is recorded (the SL writes it as null): it is news, not an error.
        try:
            self._sl.report(kind, round_no, step, metric_name, **values)
        except SwarmError as exc:
            self.log.warning("round %d: %s metrics of %s not recorded: %s", round_no, kind, self.node_id, exc)
