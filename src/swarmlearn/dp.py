"""Differential privacy for a swarm node, with the privacy spent counted by Opacus's accountant.

Record level (one node's training records): DP-SGD with the user's own optimizer. `make_private`
hands model, optimizer and data loader to Opacus (per-sample gradients clipped to `max_grad_norm`,
Gaussian noise added to their sum, batches drawn by Poisson sampling) with the noise that spends
`target_epsilon` at `delta` over the planned epochs or steps, and returns a `PrivacyAccount` that
says what has been spent so far. Give it to the SwarmCallback (`privacy=` or
`swarm.track_privacy(account)`): every sync then records ε and δ in the node's train entry
(the ledger's metrics, PERFDATA, `swarm run`'s result) and logs them.

    model, optimizer, loader, account = make_private(model, optimizer, loader, target_epsilon=8,
                                                     delta=1e-5, epochs=3, max_grad_norm=1.0)
    swarm = SwarmCallback(sync_frequency=16, min_peers=3, model=model, privacy=account)

Merging does not spend more: the merged model is a function of the nodes' private models
(post-processing), so each node's records are protected by its own ε whoever leads a round.

Client level (a whole node's contribution): the pure helpers below are what a round that adds noise
to clipped updates needs: `clip_update`, the share of noise each contributor adds
(`client_noise_std`) and the ε of the rounds run so far (`client_epsilon`). Only `client_epsilon`
and `make_private` import Opacus (and so torch); the rest needs numpy alone.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from swarmlearn.errors import ConfigError

__all__ = ["ACCOUNTANTS", "DEFAULT_DELTA", "PrivacyAccount", "client_epsilon", "client_noise_std", "clip_update",
           "make_private"]

DEFAULT_DELTA = 1e-5
# Opacus's accountants: RDP (Rényi DP, Mironov 2017; a little loose, fast, sound at any sample rate)
# and PRV (privacy random variables, Gopi et al. 2021; tighter, a few times slower).
ACCOUNTANTS = ("rdp", "prv")


@dataclass
class PrivacyAccount:
    """The privacy budget of one node's training: the target, the noise chosen for it, and ε spent so
    far at `delta` (from the Opacus accountant that counts every noisy optimizer step)."""

    target_epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    planned_steps: int
    accountant: object  # an opacus IAccountant; its history grows with each optimizer step
    level: str = "record"
    hooks: object = None  # Opacus's per-sample-gradient hooks where the model was not wrapped

    @property
    def steps(self) -> int:
        """Noisy optimizer steps taken so far."""
        return sum(int(steps) for _, _, steps in self.accountant.history)

    def epsilon(self) -> float:
        """ε spent so far at `delta` (0 before the first step)."""
        if not self.accountant.history:
            return 0.0
        with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is sound, if loose
            warnings.simplefilter("ignore", UserWarning)
            return float(self.accountant.get_epsilon(delta=self.delta))

    def describe(self) -> str:
        """One line for logs and results: level, ε spent at δ, and the target."""
        return (f"{self.level}-level DP-SGD, ε={self.epsilon():.3g} at δ={self.delta:g} after {self.steps} steps "
                f"(target ε={self.target_epsilon:g} over {self.planned_steps} steps; noise multiplier "
                f"{self.noise_multiplier:.3g}, clip {self.max_grad_norm:g})")


def make_private(model, optimizer, data_loader, *, target_epsilon: float, delta: float = DEFAULT_DELTA,
                 epochs: float | None = None, steps: int | None = None, max_grad_norm: float = 1.0,
                 accountant: str = "rdp", wrap_model: bool = True, poisson_sampling: bool = True):
    """Record-level DP-SGD for `model` trained by the user's `optimizer` on `data_loader`.

    Returns (model, optimizer, data_loader, account): Opacus's versions of the three, to train with
    instead of the originals, and the PrivacyAccount. The noise is chosen so that `epochs` passes
    over the data (or `steps` optimizer steps; give one of the two) spend `target_epsilon` at
    `delta`. With `wrap_model=False` the model is not wrapped (Opacus hooks its layers; keep using
    your own model, as a Hugging Face Trainer must) and the first item returned is the model itself.
    """
    target_epsilon = _positive("target_epsilon", target_epsilon, "the privacy budget ε (1 to 10 is usual)")
    max_grad_norm = _positive("max_grad_norm", max_grad_norm, "the per-sample gradient clip (1.0 is usual)")
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"accountant {accountant!r} is not one of {', '.join(ACCOUNTANTS)}")
    if (epochs is None) == (steps is None):
        raise ConfigError("make_private needs the training's length to choose its noise: give epochs=<passes over "
                          "the data> or steps=<optimizer steps>, not both")
    records = _records(data_loader)
    _check_delta(delta, records)
    batches = len(data_loader)
    if batches < 1:
        raise ConfigError("data_loader yields no batches; DP-SGD needs training data")
    sample_rate = 1 / batches  # Poisson sampling with the loader's batch size as the expected one
    if steps is None:
        planned = max(1, round(_positive("epochs", epochs, "passes over the data") * batches))
    elif isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a whole number >= 1 (the optimizer steps to train); got {steps!r}")
    else:
        planned = steps

    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        # Opacus explains each at length; its first sentence names the layer.
        names = "; ".join(str(e).split(". ")[0] for e in errors[:3])
        raise ConfigError(f"Opacus cannot compute per-sample gradients for this model: {names}. Replace those layers "
                          f"before make_private (opacus.validators.ModuleValidator.fix(model) swaps BatchNorm for "
                          f"GroupNorm)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # RDP's "largest alpha" note while it searches
            noise_multiplier = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                                    sample_rate=sample_rate, steps=planned, accountant=accountant)
    except ValueError as exc:
        raise ConfigError(f"target_epsilon={target_epsilon:g} at delta={delta:g} over {planned} steps cannot be "
                          f"reached ({exc}); raise target_epsilon or train fewer steps") from None
    engine = PrivacyEngine(accountant=accountant)
    try:
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=data_loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, poisson_sampling=poisson_sampling, wrap_model=wrap_model)
    except ValueError as exc:  # e.g. an optimizer over parameters the model does not have
        raise ConfigError(f"make_private: {exc}") from None
    account = PrivacyAccount(target_epsilon=target_epsilon, delta=float(delta), noise_multiplier=noise_multiplier,
                             max_grad_norm=max_grad_norm, sample_rate=sample_rate, planned_steps=planned,
                             accountant=engine.accountant)
    if not wrap_model:
        account.hooks, private_model = private_model, model
    return private_model, private_optimizer, private_loader, account


# ---------------------------------------------------------------------------------- client level

def clip_update(update, clip: float):
    """`update` (a flat numpy array or torch tensor: the change since the last merged model) scaled
    down to L2 norm `clip` if it is longer; a shorter one is returned as it is."""
    clip = _positive("clip", clip, "the L2 bound of one node's update")
    norm = float(np.linalg.norm(np.asarray(update, dtype=np.float64).ravel()))
    if not math.isfinite(norm):
        raise ValueError("update holds NaN or Inf; it cannot be clipped")
    return update * (clip / norm) if norm > clip else update


def client_noise_std(clip: float, noise_multiplier: float, max_weight: float, contributors: int) -> float:
    """The standard deviation of the Gaussian noise each of `contributors` nodes adds to its weighted,
    clipped update, so that their sum carries N(0, (noise_multiplier * clip * max_weight)^2) per
    coordinate: one node changes a weighted sum by at most clip * max_weight (its normalized weight,
    the largest of the round), the sensitivity the noise is measured against."""
    clip = _positive("clip", clip, "the L2 bound of one node's update")
    noise_multiplier = _positive("noise_multiplier", noise_multiplier, "noise std over sensitivity")
    if not (isinstance(max_weight, (int, float)) and 0 < max_weight <= 1):
        raise ConfigError(f"max_weight must be the largest normalized weight, in (0, 1]; got {max_weight!r}")
    if isinstance(contributors, bool) or not isinstance(contributors, int) or contributors < 1:
        raise ConfigError(f"contributors must be a whole number >= 1, got {contributors!r}")
    return noise_multiplier * clip * max_weight / math.sqrt(contributors)


def client_epsilon(noise_multiplier: float, rounds: int, delta: float = DEFAULT_DELTA) -> float:
    """ε at `delta` after `rounds` rounds in which every node took part (sample rate 1) and the sum of
    the clipped updates carried noise of `noise_multiplier` times its sensitivity (Opacus's RDP
    accountant)."""
    noise_multiplier = _positive("noise_multiplier", noise_multiplier, "noise std over sensitivity")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ConfigError(f"rounds must be a whole number >= 0, got {rounds!r}")
    _check_delta(delta, None)
    if rounds == 0:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), 1.0, rounds)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta=delta))


# ---------------------------------------------------------------------------------- checks

def _positive(name: str, value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a number > 0 ({what}); got {value!r}")
    return float(value)


def _check_delta(delta, records: int | None) -> None:
    """δ is the chance the guarantee fails outright: it must be well below 1/records, or a mechanism
    that publishes one whole record at random would meet it."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), well below 1/<number of training records>; got {delta!r}")
    if records is not None and delta >= 1 / records:
        raise ConfigError(f"delta={delta:g} is not below 1/{records} (one over this node's {records} training "
                          f"records): such a δ allows leaking a whole record; use delta <= {0.1 / records:.1g}")


def _records(data_loader) -> int | None:
    try:
        return len(data_loader.dataset)
    except (AttributeError, TypeError):
        return None
