"""What every attack shares: the call `attack(images, labels) -> adversarial images`, the
losses an attack maximizes, and the l_inf / l_2 geometry of its budget.

A model under attack maps [0,1] images to logits. A stochastic model (the defended
classifier, whose purification draws fresh noise) may also offer `sample_logits(x, n)`:
n independent draws in one call, sharing whatever does not depend on the noise.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("ce", "margin")
NORMS = ("linf", "l2")


@runtime_checkable
class Defended(Protocol):
    """A classifier behind a defense (defense.pipeline.DefendedClassifier): its bare `classifier`, the
    detector's decision, its purification draws, and whether its answers are `stochastic` (fresh
    purification noise per call). An attack or an evaluation asks `isinstance(model, Defended)`."""

    classifier: nn.Module

    def purify_draws(self, images, draws, scores=None): ...

    def sample_logits(self, images, draws, scores=None): ...

    def decide(self, images, scores=None): ...

    def threshold(self): ...


def is_stochastic(model: nn.Module) -> bool:
    """A defended model whose answers draw fresh purification noise (a bare classifier: never)."""
    return isinstance(model, Defended) and bool(model.stochastic)


class Attack:
    """Base class: keeps the model in eval mode while attacking and restores its mode."""

    name = "attack"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            return self.perturb(images.detach(), labels.detach())
        finally:
            self.model.train(was_training)

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"attack": type(self).__name__}


def attack_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """Per-scan loss the attacker maximizes: cross-entropy, or the margin max_{j != y} z_j - z_y
    (Carlini-Wagner; positive once the scan is misclassified). Two classes suffice for both."""
    if kind == "ce":
        return F.cross_entropy(logits, labels, reduction="none")
    if kind == "margin":
        true = logits.gather(1, labels[:, None]).squeeze(1)
        others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
        return others.max(dim=1).values - true
    raise ValueError(f"attack loss must be one of {LOSSES}, not '{kind}'")


def sample_logits(model: nn.Module, x: torch.Tensor, draws: int) -> torch.Tensor:
    """(draws, B, C) logits from `draws` forward passes (one call where the model offers it)."""
    if draws > 1 and isinstance(model, Defended):
        return model.sample_logits(x, draws)
    return torch.stack([model(x) for _ in range(draws)])


def l2_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view((-1,) + (1,) * (t.dim() - 1))


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Onto the eps-ball of the norm."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / l2_norm(delta).clamp_min(1e-12)).clamp(max=1.0)


def steepest_step(grad: torch.Tensor, alpha: float, norm: str) -> torch.Tensor:
    """The norm's steepest-ascent step of length alpha."""
    if norm == "linf":
        return alpha * grad.sign()
    return alpha * grad / l2_norm(grad).clamp_min(1e-12)


def seeded_generator(seed: int | None, call: int, device: torch.device) -> torch.Generator:
    """A generator that differs per call but repeats across runs (fresh entropy when seed is None)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed * 1_000_003 + call)
    return gen
