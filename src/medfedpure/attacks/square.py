"""Square attack, l_inf (Andriushchenko et al., ECCV 2020): random search with no gradients.

Each query changes one random square window of the perturbation to +-eps per channel and
keeps the change if the margin loss of the true class drops. It needs only the model's
outputs, so a defense that merely hides its gradients (noise, non-differentiable steps)
cannot stop it: when Square beats the gradient attacks, the gradients were masked.
On a stochastic defense each query sees one fresh draw (or the mean of `eot` draws).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medfedpure.attacks.base import Attack, attack_loss, sample_logits, seeded_generator


def square_fraction(p_init: float, query: int, n_queries: int) -> float:
    """The paper's schedule for the share of pixels in the window, halved at fixed points
    of a 10000-query budget (rescaled to `n_queries`)."""
    i = int(query / n_queries * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256)):
        if i <= bound:
            return p_init / div
    return p_init / 512


class Square(Attack):
    name = "square"

    def __init__(self, model: nn.Module, eps: float = 0.015, n_queries: int = 1000, p_init: float = 0.05,
                 seed: int | None = 0, eot: int = 1) -> None:
        super().__init__(model)
        if n_queries < 1:
            raise ValueError("Square needs at least one query")
        self.eps, self.n_queries, self.p_init, self.seed, self.eot = float(eps), int(n_queries), p_init, seed, eot
        self._calls = 0

    def describe(self) -> dict:
        return {"attack": self.name, "norm": "linf", "eps": self.eps, "queries": self.n_queries,
                "p_init": self.p_init, "eot": self.eot, "loss": "margin"}

    @torch.no_grad()
    def _margin(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over draws of max_{j != y} z_j - z_y; the attack wants it positive."""
        return torch.stack([attack_loss(z, labels, "margin") for z in sample_logits(self.model, x, self.eot)]).mean(0)

    @torch.no_grad()
    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        gen = seeded_generator(self.seed, self._calls, images.device)
        self._calls += 1
        b, c, h, w = images.shape

        def signs(*shape: int) -> torch.Tensor:
            return torch.randint(0, 2, shape, generator=gen, device=images.device).float() * 2 - 1

        # start: vertical stripes of +-eps, one sign per column and channel
        best = (images + self.eps * signs(b, c, 1, w)).clamp(0, 1)
        margin = self._margin(best, labels)
        rows = torch.arange(h, device=images.device).view(1, 1, h, 1)
        cols = torch.arange(w, device=images.device).view(1, 1, 1, w)
        for query in range(1, self.n_queries):
            todo = (margin <= 0).nonzero().flatten()  # scans still classified correctly
            if len(todo) == 0:
                break
            x, cur = images[todo], best[todo]
            side = max(1, min(h - 1, int(round(math.sqrt(square_fraction(self.p_init, query, self.n_queries) * h * w)))))
            top = torch.randint(0, h - side + 1, (len(todo), 1, 1, 1), generator=gen, device=images.device)
            left = torch.randint(0, w - side + 1, (len(todo), 1, 1, 1), generator=gen, device=images.device)
            window = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
            delta = torch.where(window, self.eps * signs(len(todo), c, 1, 1), cur - x)
            candidate = (x + delta).clamp(0, 1)
            new_margin = self._margin(candidate, labels[todo])
            better = new_margin > margin[todo]
            best[todo[better]] = candidate[better]
            margin[todo[better]] = new_margin[better]
        return best
