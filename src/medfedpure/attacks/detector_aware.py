"""EOT-PGD that also keeps the detector quiet (Carlini & Wagner, 2017, on detectors).

The attacker maximizes the classification loss through the whole defended classifier minus
`weight * max(0, score / tau - margin)`: above the threshold the detector flags the scan and it
is purified deeper (graded) or at all (selective); below it the scan passes shallow or
untouched. The attack therefore chooses how deep its scan is purified. The score is the
defense's own detector, differentiable, and the same on every draw.
"""

from __future__ import annotations

import torch
from torch import nn

from medfedpure.attacks.base import Defended, attack_loss
from medfedpure.attacks.pgd import PGD


class DetectorAwarePGD(PGD):
    name = "detector-aware"

    def __init__(self, model: nn.Module, *args, weight: float = 1.0, margin: float = 0.8, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        self.weight, self.margin = float(weight), float(margin)

    def describe(self) -> dict:
        return {**super().describe(), "detector_weight": self.weight, "tau_margin": self.margin}

    def objective(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        defended = self.model
        tau = defended.threshold() if isinstance(defended, Defended) else None
        if tau is None:  # no detector to evade: plain EOT-PGD
            return super().objective(x, labels)
        scores = defended.detector(x)
        logits = defended.sample_logits(x, self.eot, scores=scores)
        loss = torch.stack([attack_loss(z, labels, self.loss) for z in logits]).mean(dim=0)
        return loss - self.weight * torch.relu(scores / tau - self.margin)
