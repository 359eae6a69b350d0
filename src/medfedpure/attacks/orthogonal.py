"""Orthogonal PGD against a detector (Bryniarski, Hingun, Pachuca, Wang & Carlini, 2022,
"Evading adversarial example detectors: a simple approach").

`detector-aware` adds the detector's score to the loss with a fixed weight, and one of the two
terms wins. Orthogonal PGD takes turns instead, per scan and per step: while the answer the
defense gives an *unflagged* scan is still right, it steps along the classification loss with
the component along the score's gradient removed (the step does not raise the score); once that
answer is wrong but the scan would still be flagged, it steps down the score with the component
along the classification gradient removed (the step does not undo the misclassification).

The unflagged answer is the classifier on the scan itself (selective mode) or on its
purification at t_min (graded mode, averaged over `eot` fresh draws). A scan succeeds when its
score is under `margin * tau` and that answer is wrong; each scan keeps its best iterate,
successes first. Without a detector this is plain EOT-PGD.
"""

from __future__ import annotations

import torch
from torch import nn

from medfedpure.attacks.base import Defended, attack_loss, project, steepest_step
from medfedpure.attacks.pgd import PGD, _better


def remove_component(g: torch.Tensor, along: torch.Tensor) -> torch.Tensor:
    """Per scan, `g` minus its projection on `along` (unchanged where `along` is zero)."""
    gf, af = g.flatten(1), along.flatten(1)
    coef = (gf * af).sum(1) / (af * af).sum(1).clamp_min(1e-30)
    return (gf - coef[:, None] * af).view_as(g)


class OrthogonalPGD(PGD):
    name = "orthogonal"

    def __init__(self, model: nn.Module, *args, margin: float = 0.95, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        self.margin = float(margin)

    def describe(self) -> dict:
        return {**super().describe(), "tau_margin": self.margin}

    def _draws(self) -> int:
        """EOT draws of the unflagged answer: one where it is deterministic (selective mode)."""
        return self.eot if self.model.unflagged_stochastic else 1

    def _status(self, x: torch.Tensor, labels: torch.Tensor, tau: float, grads: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(margin of the unflagged answer, whether the score is under margin * tau, gradient of
        the classification loss, gradient of minus the score / tau); gradients only if `grads`."""
        defended = self.model
        x = x.detach().requires_grad_(grads)
        with torch.set_grad_enabled(grads):
            scores, logits = defended.scores_and_unflagged_logits(x, self._draws())
            g_cls = g_det = None
            if grads:  # the two share the classifier's call on the scan in selective mode
                loss = torch.stack([attack_loss(z, labels, self.loss) for z in logits]).mean(0)
                g_cls, = torch.autograd.grad(loss.sum(), x, retain_graph=True)
                g_det, = torch.autograd.grad(-(scores / tau).sum(), x)
        with torch.no_grad():
            margin = torch.stack([attack_loss(z, labels, "margin") for z in logits.detach()]).mean(0)
        return margin, scores.detach() < self.margin * tau, g_cls, g_det

    @staticmethod
    def _value(margin: torch.Tensor, quiet: torch.Tensor) -> torch.Tensor:
        """What keep-best ranks: successes (quiet and wrong) first by margin, then quiet scans, then flagged."""
        return margin + 1e6 * (quiet & (margin > 0)).float() - 1e6 * (~quiet).float()

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        tau = self.model.threshold() if isinstance(self.model, Defended) else None
        if tau is None:  # no detector to evade
            return super().perturb(images, labels)
        x_adv = images.clone()
        if self.random_start and self.eps > 0:
            x_adv = (images + self._random_delta(images)).clamp(0, 1)
        best, best_value = x_adv, torch.full(labels.shape, float("-inf"), device=images.device)
        for _ in range(self.steps):
            margin, quiet, g_cls, g_det = self._status(x_adv, labels, tau, grads=True)
            best, best_value = _better(x_adv, self._value(margin, quiet), best, best_value)
            evade = ((margin > 0) & ~quiet).view(-1, 1, 1, 1)  # wrong already, still flagged: lower the score
            direction = torch.where(evade, remove_component(g_det, g_cls), remove_component(g_cls, g_det))
            x_adv = (images + project(x_adv + steepest_step(direction, self.alpha, self.norm) - images,
                                      self.eps, self.norm)).clamp(0, 1).detach()
        margin, quiet, _, _ = self._status(x_adv, labels, tau, grads=False)
        return _better(x_adv, self._value(margin, quiet), best, best_value)[0]

