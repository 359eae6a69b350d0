"""Single-step attacks for cheap adversarial training (l_inf): one gradient per scan instead of PGD's k.

- `FGSMRS`: FGSM from a random start (Wong, Rice and Kolter, ICLR 2020): delta0 ~ U(-eps, eps),
  one signed step of `alpha` (1.25 eps by default), projected back onto the eps-ball.
- `NFGSM`: N-FGSM (de Jorge et al., NeurIPS 2022): stronger noise, eta ~ U(-k, k) with k = 2 eps
  by default, one signed step of `alpha` (eps by default) from it, and no projection: the
  training perturbation may reach k + alpha. The paper finds this avoids catastrophic
  overfitting where FGSM-RS falls into it, at the cost of one gradient.

Both are `PGD` with one step and their own start and projection, so they take the same model
(a stochastic one is averaged over `eot` draws) and loss, and are called the same way:
`attack(images, labels) -> adversarial images`. They are training attacks: evaluate with PGD.
"""

from __future__ import annotations

import torch
from torch import nn

from medfedpure.attacks.base import project, steepest_step
from medfedpure.attacks.pgd import PGD


class FGSMRS(PGD):
    name = "fgsm-rs"

    def __init__(self, model: nn.Module, eps: float = 0.015, alpha: float | None = None, seed: int | None = 0,
                 eot: int = 1, loss: str = "ce") -> None:
        super().__init__(model, eps=eps, alpha=1.25 * eps if alpha is None else alpha, steps=1, norm="linf",
                         random_start=True, seed=seed, eot=eot, loss=loss)

    @property
    def label(self) -> str:
        return f"FGSM-RS linf eps={self.eps:g} alpha={self.alpha:g}"

    def describe(self) -> dict:
        return {"attack": self.name, "norm": "linf", "eps": self.eps, "alpha": self.alpha, "eot": self.eot,
                "loss": self.loss}

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        start = (images + self._random_delta(images)).clamp(0, 1)
        grad = self.gradient(start, labels)
        delta = project(start + steepest_step(grad, self.alpha, "linf") - images, self.eps, "linf")
        return (images + delta).clamp(0, 1).detach()


class NFGSM(PGD):
    name = "n-fgsm"

    def __init__(self, model: nn.Module, eps: float = 0.015, alpha: float | None = None, noise: float | None = None,
                 seed: int | None = 0, eot: int = 1, loss: str = "ce") -> None:
        super().__init__(model, eps=eps, alpha=eps if alpha is None else alpha, steps=1, norm="linf",
                         random_start=True, seed=seed, eot=eot, loss=loss)
        self.noise = 2.0 * self.eps if noise is None else float(noise)
        if self.noise < 0:
            raise ValueError("N-FGSM noise (the half-width k of its uniform start) must be >= 0")

    @property
    def label(self) -> str:
        return f"N-FGSM linf eps={self.eps:g} alpha={self.alpha:g} noise={self.noise:g}"

    def describe(self) -> dict:
        return {"attack": self.name, "norm": "linf", "eps": self.eps, "alpha": self.alpha, "noise": self.noise,
                "eot": self.eot, "loss": self.loss}

    def _random_delta(self, x: torch.Tensor) -> torch.Tensor:
        return super()._random_delta(x) * (self.noise / self.eps) if self.eps > 0 else torch.zeros_like(x)

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        start = (images + self._random_delta(images)).clamp(0, 1)
        grad = self.gradient(start, labels)
        return (start + steepest_step(grad, self.alpha, "linf")).clamp(0, 1).detach()
