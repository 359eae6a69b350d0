"""Auto-PGD (Croce & Hein, ICML 2020), the gradient attack of AutoAttack, l_inf and l_2.

PGD with momentum (0.75) whose step size needs no tuning: it starts at 2 eps, one per scan, and
halves at checkpoints (after 22% of the steps, then at intervals shrinking by 3% down to 6%) for
each scan whose objective rose in fewer than 75% of the steps since the last checkpoint, or did
not improve since it while the step stayed the same; such a scan restarts from the best point it
has seen. The attack returns each scan's best point. With `eot=N` each step follows the gradient
of the objective averaged over N fresh forward passes, as `PGD` does; on a stochastic defense the
objective the checkpoints compare is that average too.
"""

from __future__ import annotations

import torch
from torch import nn

from medfedpure.attacks.base import project, steepest_step
from medfedpure.attacks.pgd import PGD


def checkpoints(steps: int) -> list[int]:
    """The steps after which the step sizes are checked: the first after 22% of them, then at
    intervals shrinking by 3% of them per checkpoint, never below 6%."""
    out, interval, at = [], max(int(0.22 * steps), 1), 0
    shrink, floor = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    while at + interval <= steps:
        at += interval
        out.append(at)
        interval = max(interval - shrink, floor)
    return out


class APGD(PGD):
    name = "apgd"

    def __init__(self, model: nn.Module, eps: float = 0.015, steps: int = 50, norm: str = "linf",
                 random_start: bool = True, seed: int | None = 0, eot: int = 1, loss: str = "ce",
                 rho: float = 0.75, momentum: float = 0.75) -> None:
        # no step size to take (it starts at 2 eps), and each scan's best point is what it returns
        super().__init__(model, eps=eps, alpha=2 * eps, steps=steps, norm=norm, random_start=random_start,
                         seed=seed, eot=eot, loss=loss, keep_best=True)
        self.rho, self.momentum = float(rho), float(momentum)

    def describe(self) -> dict:
        out = {**super().describe(), "rho": self.rho, "momentum": self.momentum}
        out.pop("alpha")
        return out

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (images.dim() - 1)

        def inside(x: torch.Tensor) -> torch.Tensor:
            return (images + project(x - images, self.eps, self.norm)).clamp(0, 1)

        x = images.clone()
        if self.random_start and self.eps > 0:
            x = (images + self._random_delta(images)).clamp(0, 1)
        value, grad = self.value_and_gradient(x, labels)
        best, best_value, best_grad = x.clone(), value.clone(), grad.clone()
        step = torch.full_like(value, 2 * self.eps)
        previous = x.clone()
        checks = set(checkpoints(self.steps))
        since, rises = 0, torch.zeros_like(value)
        value_at_check, reduced_at_check = best_value.clone(), torch.ones_like(value, dtype=torch.bool)
        for i in range(self.steps):
            moved = inside(x + steepest_step(grad, 1.0, self.norm) * step.view(shape))
            a = self.momentum if i > 0 else 1.0
            x, previous = inside(x + a * (moved - x) + (1 - a) * (x - previous)).detach(), x
            last = value
            value, grad = self.value_and_gradient(x, labels)
            rises += (value > last).float()
            better = value > best_value
            best[better], best_value[better], best_grad[better] = x[better], value[better], grad[better]
            since += 1
            if i + 1 in checks:
                stalled = rises <= since * self.rho
                stalled |= ~reduced_at_check & (value_at_check >= best_value)
                reduced_at_check, value_at_check = stalled.clone(), best_value.clone()
                if stalled.any():  # halve the step and restart from the best point
                    step[stalled] /= 2
                    x[stalled], grad[stalled] = best[stalled], best_grad[stalled]
                    previous[stalled] = best[stalled]
                since, rises = 0, torch.zeros_like(value)
        return best
