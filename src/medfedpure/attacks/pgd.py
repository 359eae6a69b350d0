"""Projected gradient descent (Madry et al.), l_inf and l_2, with random start.

Works on any `nn.Module` that maps [0,1] images to logits (for the MoE: log p(y|x),
so cross-entropy on them is the true -log p(y|x)). Same call as torchattacks:
`attack(images, labels) -> adversarial images`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attack:
    """Base class: keeps the model in eval mode while attacking and restores its mode."""

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


class PGD(Attack):
    def __init__(self, model: nn.Module, eps: float = 0.015, alpha: float = 0.003, steps: int = 7,
                 norm: str = "linf", random_start: bool = True, seed: int | None = 0) -> None:
        super().__init__(model)
        if norm not in {"linf", "l2"}:
            raise ValueError(f"PGD norm must be 'linf' or 'l2', not '{norm}'")
        self.eps, self.alpha, self.steps = float(eps), float(alpha), int(steps)
        self.norm, self.random_start, self.seed = norm, random_start, seed
        self._calls = 0  # varies the random start between batches, reproducibly

    def describe(self) -> dict:
        return {"attack": f"PGD-{self.norm}", "eps": self.eps, "alpha": self.alpha,
                "steps": self.steps, "random_start": self.random_start}

    def _random_delta(self, x: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator(device=x.device)
        if self.seed is not None:
            gen.manual_seed(self.seed * 1_000_003 + self._calls)
            self._calls += 1
        else:
            gen.seed()
        if self.norm == "linf":
            return (torch.rand(x.shape, generator=gen, device=x.device) * 2 - 1) * self.eps
        # random direction, radius uniform in [0, eps] (as torchattacks' PGDL2); a start drawn
        # uniformly from the ball would sit almost on its surface in high dimension
        direction = torch.randn(x.shape, generator=gen, device=x.device)
        direction = direction / _l2(direction).clamp_min(1e-12)
        radius = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=gen, device=x.device)
        return direction * radius * self.eps

    def _project(self, delta: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            return delta.clamp(-self.eps, self.eps)
        factor = (self.eps / _l2(delta).clamp_min(1e-12)).clamp(max=1.0)
        return delta * factor

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x_adv = images.clone()
        if self.random_start and self.eps > 0:
            x_adv = (images + self._random_delta(images)).clamp(0, 1)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(self.model(x_adv), labels)
                grad, = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                if self.norm == "linf":
                    step = self.alpha * grad.sign()
                else:
                    step = self.alpha * grad / _l2(grad).clamp_min(1e-12)
                delta = self._project(x_adv + step - images)
                x_adv = (images + delta).clamp(0, 1)
        return x_adv.detach()


def _l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view((-1,) + (1,) * (t.dim() - 1))
