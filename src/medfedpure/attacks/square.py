"""Square attack (Andriushchenko et al., ECCV 2020): random search with no gradients, l_inf and l_2.

l_inf: each query changes one random square window of the perturbation to +-eps per channel and
keeps the change if the margin loss of the true class drops. l_2 (`SquareL2`): each query moves
the perturbation's mass from one random window into another, where it puts a "pseudo-Gaussian"
(concentric rectangles of opposite sign in each half) on top of what was there, keeping the
perturbation on the eps sphere. It needs only the model's
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


def _rectangles(rows: int, cols: int) -> torch.Tensor:
    """Concentric rectangles around the centre, the k-th adding 1 / (k + 1)^2, unit l_2 norm."""
    out = torch.zeros(rows, cols)
    r0, c0 = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        out[max(r0 - k, 0):min(r0 + k + 1, rows), max(c0 - k, 0):min(c0 + k + 1, cols)] += 1.0 / (k + 1) ** 2
    return out / out.norm()


def pseudo_gaussian(side: int, transpose: bool) -> torch.Tensor:
    """The l_2 Square attack's window (the paper's eta): rectangles in one half, their negative in the
    other, unit l_2 norm, the halves side by side when `transpose`."""
    eta = torch.cat([_rectangles(side // 2, side), -_rectangles(side - side // 2, side)])
    eta = eta / eta.norm()
    return eta.t() if transpose else eta


class SquareL2(Square):
    """The l_2 Square attack: a perturbation of l_2 norm eps found by random search on the margin."""

    name = "square"

    def __init__(self, model: nn.Module, eps: float = 0.5, n_queries: int = 1000, p_init: float = 0.1,
                 seed: int | None = 0, eot: int = 1) -> None:
        super().__init__(model, eps, n_queries, p_init, seed, eot)  # p_init: the authors' l_2 setting

    def describe(self) -> dict:
        return {**super().describe(), "norm": "l2"}

    @torch.no_grad()
    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        gen = seeded_generator(self.seed, self._calls, images.device)
        self._calls += 1
        b, c, h, w = images.shape
        dev = images.device

        def signs(*shape: int) -> torch.Tensor:
            return torch.randint(0, 2, shape, generator=gen, device=dev).float() * 2 - 1

        def coin() -> bool:
            return bool(torch.randint(0, 2, (1,), generator=gen, device=dev).item())

        def on_sphere(delta: torch.Tensor) -> torch.Tensor:  # norm eps per scan
            return self.eps * delta / (delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12)

        # start: a grid of windows of a fifth of the side, each a pseudo-Gaussian with a sign per channel
        side = max(h // 5, 1)
        start = torch.zeros_like(images)
        off = (h - 5 * side) // 2
        for top in range(off, h - side + 1, side):
            for left in range(off, w - side + 1, side):
                start[:, :, top:top + side, left:left + side] += (
                    pseudo_gaussian(side, coin()).to(dev) * signs(b, c, 1, 1))
        best = (images + on_sphere(start)).clamp(0, 1)
        margin = self._margin(best, labels)
        for query in range(1, self.n_queries):
            todo = (margin <= 0).nonzero().flatten()
            if len(todo) == 0:
                break
            x, delta = images[todo], (best[todo] - images[todo]).clone()
            side = max(int(round(math.sqrt(square_fraction(self.p_init, query, self.n_queries) * h * w))), 3)
            side = min(side + (side % 2 == 0), h - 1, w - 1)
            (t1, l1), (t2, l2) = ((int(torch.randint(0, h - side + 1, (1,), generator=gen, device=dev)),
                                   int(torch.randint(0, w - side + 1, (1,), generator=gen, device=dev)))
                                  for _ in range(2))
            win1 = (slice(None), slice(None), slice(t1, t1 + side), slice(l1, l1 + side))
            win2 = (slice(None), slice(None), slice(t2, t2 + side), slice(l2, l2 + side))
            both = torch.zeros_like(delta)
            both[win1], both[win2] = 1.0, 1.0
            total = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            in_windows = (delta * both).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            old = delta[win1]
            new = pseudo_gaussian(side, coin()).to(dev) * signs(len(todo), c, 1, 1)
            new = new + old / (old.flatten(2).norm(dim=2)[..., None, None] + 1e-12)
            # the windows' mass, plus what the perturbation lacks of eps, spread over the channels
            mass = ((self.eps ** 2 - total ** 2).clamp_min(0) / c + in_windows ** 2).sqrt()
            new = new / (new.flatten(2).norm(dim=2)[..., None, None] + 1e-12) * mass
            delta[win2] = 0.0
            delta[win1] = new
            candidate = (x + on_sphere(delta)).clamp(0, 1)
            new_margin = self._margin(candidate, labels[todo])
            better = new_margin > margin[todo]
            best[todo[better]] = candidate[better]
            margin[todo[better]] = new_margin[better]
        return best
