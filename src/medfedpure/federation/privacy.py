"""Client-level differential privacy of phase 3's experts (and, with `federation.dp_pretraining`, of
phases 1, 2 and 4's U-Net and MAE, in one budget with them), as Flower's client-side fixed clipping
(McMahan et al. 2018; Andrew et al. 2021): each hospital clips its update to an L2 norm C before it
leaves, the server adds Gaussian noise of std z*C/m to the average of the m updates, and Flower's
RDP accountant (Google's dp-accounting) composes the rounds into (epsilon, delta). The unit of
privacy is a hospital: adding or removing one hospital's whole data changes the released
experts by a bounded amount. Every hospital is asked every round, so no sampling amplification
is claimed. Flower's own wrapper strategy accounts only for an unmodified FedAvg and skips a round
with any failure; our strategies (`strategy.ResumableFedAvg.combine`) keep their checks, failures
and resume, and use Flower's pieces (the clipping, the std, the accountant) here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_clip_model_update, compute_stdv, get_norm
from flwr.supercore.privacy_accounting import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig,
                                               SamplingMethod)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

__all__ = ["KEY_CLIPPING_NORM", "Privacy", "clip_update", "epsilon_after", "noise_for_epsilon"]


def _accountant(delta: float, hospitals: int) -> RdpAccountant:
    return RdpAccountant(PrivacyConfig(target_delta=delta, population_size=hospitals,
                                       neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       sampling_method=SamplingMethod.NO_AMPLIFICATION))


def epsilon_after(noise_multiplier: float, rounds: int, delta: float, hospitals: int) -> float:
    """The epsilon at `delta` of `rounds` releases with noise multiplier z."""
    acc = _accountant(delta, hospitals)
    acc.compose(GaussianPrivacyEvent(noise_multiplier, hospitals, hospitals), rounds)
    return acc.get_epsilon(delta)


def noise_for_epsilon(epsilon: float, rounds: int, delta: float, hospitals: int) -> float:
    """The smallest noise multiplier (to 0.1%) whose `rounds` releases stay within `epsilon` at `delta`."""
    lo, hi = 1e-3, 1.0
    while epsilon_after(hi, rounds, delta, hospitals) > epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {epsilon} in {rounds} rounds")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if epsilon_after(mid, rounds, delta, hospitals) > epsilon else (lo, mid)
    return hi


def clip_update(sent: dict[str, np.ndarray], new: dict[str, np.ndarray], clipping_norm: float
                ) -> tuple[dict[str, np.ndarray], float]:
    """`new` with its update from `sent` clipped to L2 norm `clipping_norm` over every float array
    (BatchNorm's running statistics are data too); integer buffers (num_batches_tracked, which
    counts the hospital's batches) go back as they came. Returns the arrays and the update's norm
    before clipping."""
    floats = [k for k in new if np.issubdtype(new[k].dtype, np.floating)]
    before = get_norm([new[k] - sent[k] for k in floats])
    # flattened: Flower's clipping scales each update array in place, which a 0-d array cannot be
    params = [np.array(new[k], copy=True).reshape(-1) for k in floats]
    compute_clip_model_update(params, [sent[k].reshape(-1) for k in floats], clipping_norm)
    out = {k: sent[k].copy() for k in new}
    out.update((k, np.asarray(v, dtype=new[k].dtype).reshape(new[k].shape)) for k, v in zip(floats, params))
    return out, before


@dataclass
class Privacy:
    """The server's side of one phase: noise on the average and the accountant, which starts with the
    `earlier_rounds` releases of the private phases before this one (`federation.dp_pretraining`:
    one budget over every phase) and is replayed from the rounds this phase already did. `stream`
    keeps each phase's noise apart (phase 3's is 0)."""

    noise_multiplier: float
    clipping_norm: float
    delta: float
    hospitals: int
    seed: int = 0
    earlier_rounds: int = 0
    stream: int = 0

    def __post_init__(self) -> None:
        self.accountant = _accountant(self.delta, self.hospitals)
        if self.earlier_rounds:
            self.accountant.compose(GaussianPrivacyEvent(self.noise_multiplier, self.hospitals, self.hospitals),
                                    self.earlier_rounds)

    def replay(self, history: dict[int, dict]) -> None:
        """Compose the releases of the rounds a resumed run already made."""
        for rnd in sorted(history):
            if "dp" in history[rnd]:
                d = history[rnd]["dp"]
                self.accountant.compose(GaussianPrivacyEvent(d["noise_multiplier"], d["hospitals"], self.hospitals))

    def release(self, server_round: int, arrays: dict[str, np.ndarray], answered: int) -> tuple[dict, dict]:
        """The average of `answered` clipped updates with its noise, and the round's record."""
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, answered)
        rng = np.random.default_rng([self.seed, server_round, 0xD9] + ([self.stream] if self.stream else []))
        noisy = {k: np.asarray(v + rng.normal(0.0, std, v.shape).astype(v.dtype), dtype=v.dtype)
                 if np.issubdtype(v.dtype, np.floating) else v for k, v in arrays.items()}
        self.accountant.compose(GaussianPrivacyEvent(self.noise_multiplier, answered, self.hospitals))
        spent = self.accountant.get_privacy_spent()
        return noisy, {"noise_multiplier": self.noise_multiplier, "clipping_norm": self.clipping_norm,
                       "noise_std": std, "hospitals": answered, "epsilon": spent.epsilon, "delta": spent.delta}
