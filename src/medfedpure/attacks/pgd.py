"""Projected gradient descent (Madry et al.), l_inf and l_2, with random start, and its
expectation-over-transformation form for stochastic models (Athalye et al., 2018).

`PGD(model, eot=1)` on a deterministic classifier is the classic attack. With `eot=N` every
step follows the gradient of the loss averaged over N fresh forward passes, which is how a
defense that draws random purification noise is attacked honestly: the gradient goes through
the purifier and the noise is averaged out. With `keep_best` each scan keeps the iterate with
the highest objective seen (as AutoAttack does) instead of the last one. Same call as
torchattacks: `attack(images, labels) -> adversarial images`.
"""

from __future__ import annotations

import torch
from torch import nn

from medfedpure.attacks.base import (LOSSES, NORMS, Attack, attack_loss, l2_norm, project, sample_logits,
                                     seeded_generator, steepest_step)


class PGD(Attack):
    name = "pgd"

    def __init__(self, model: nn.Module, eps: float = 0.015, alpha: float = 0.003, steps: int = 7,
                 norm: str = "linf", random_start: bool = True, seed: int | None = 0, eot: int = 1,
                 loss: str = "ce", keep_best: bool = False) -> None:
        super().__init__(model)
        if norm not in NORMS:
            raise ValueError(f"PGD norm must be 'linf' or 'l2', not '{norm}'")
        if loss not in LOSSES:
            raise ValueError(f"attack loss must be one of {LOSSES}, not '{loss}'")
        if eot < 1:
            raise ValueError("eot (forward passes averaged per step) must be >= 1")
        self.eps, self.alpha, self.steps = float(eps), float(alpha), int(steps)
        self.norm, self.random_start, self.seed = norm, random_start, seed
        self.eot, self.loss, self.keep_best = int(eot), loss, keep_best
        self._calls = 0  # varies the random start between batches, reproducibly

    @staticmethod
    def label_for(norm: str, eps: float, alpha: float, steps: int) -> str:
        return f"PGD {norm} eps={eps:g} alpha={alpha:g} steps={steps}"

    @property
    def label(self) -> str:
        return self.label_for(self.norm, self.eps, self.alpha, self.steps)

    def describe(self) -> dict:
        return {"attack": self.name, "norm": self.norm, "eps": self.eps, "alpha": self.alpha, "steps": self.steps,
                "eot": self.eot, "loss": self.loss, "random_start": self.random_start, "keep_best": self.keep_best}

    def objective(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-scan quantity to maximize, averaged over `eot` forward passes."""
        logits = sample_logits(self.model, x, self.eot)
        return torch.stack([attack_loss(z, labels, self.loss) for z in logits]).mean(dim=0)

    def value_and_gradient(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            value = self.objective(x, labels)
            grad, = torch.autograd.grad(value.sum(), x)
        return value.detach(), grad

    def gradient(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.value_and_gradient(x, labels)[1]

    def _random_delta(self, x: torch.Tensor) -> torch.Tensor:
        gen = seeded_generator(self.seed, self._calls, x.device)
        self._calls += 1
        if self.norm == "linf":
            return (torch.rand(x.shape, generator=gen, device=x.device) * 2 - 1) * self.eps
        # random direction, radius uniform in [0, eps] (as torchattacks' PGDL2); a start drawn
        # uniformly from the ball would sit almost on its surface in high dimension
        direction = torch.randn(x.shape, generator=gen, device=x.device)
        direction = direction / l2_norm(direction).clamp_min(1e-12)
        radius = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=gen, device=x.device)
        return direction * radius * self.eps

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x_adv = images.clone()
        if self.random_start and self.eps > 0:
            x_adv = (images + self._random_delta(images)).clamp(0, 1)
        best, best_value = x_adv, torch.full(labels.shape, float("-inf"), device=images.device)
        for _ in range(self.steps):
            value, grad = self.value_and_gradient(x_adv, labels)
            if self.keep_best:
                best, best_value = _better(x_adv, value, best, best_value)
            x_adv = (images + project(x_adv + steepest_step(grad, self.alpha, self.norm) - images,
                                      self.eps, self.norm)).clamp(0, 1).detach()
        if not self.keep_best:
            return x_adv
        with torch.no_grad():
            return _better(x_adv, self.objective(x_adv, labels), best, best_value)[0]


def _better(x: torch.Tensor, value: torch.Tensor, best: torch.Tensor, best_value: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scan, the iterate with the higher objective."""
    take = value > best_value
    return torch.where(take.view((-1,) + (1,) * (x.dim() - 1)), x, best), torch.where(take, value, best_value)
