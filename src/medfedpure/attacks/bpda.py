"""BPDA (Athalye et al., 2018): the forward pass through the whole defended classifier, the
backward pass as if purification were the identity (straight-through).

A second gradient estimate beside exact EOT-PGD: if the purifier's own gradients were
obfuscated (vanishing through a deep sampler, say), BPDA still pushes the classifier's
input where the classifier breaks. Averaged over `eot` purification draws like EOT-PGD.
"""

from __future__ import annotations

import torch

from medfedpure.attacks.base import Defended, attack_loss
from medfedpure.attacks.pgd import PGD


class BPDA(PGD):
    name = "bpda"

    def objective(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        defended = self.model
        if not isinstance(defended, Defended):  # nothing to approximate: plain PGD
            return super().objective(x, labels)
        with torch.no_grad():
            views = defended.purify_draws(x, self.eot)
        losses = []
        for group in views:  # one group of voted views per draw
            straight_through = [x + (v - x).detach() for v in group]  # value: purified; gradient: identity
            losses.append(attack_loss(defended.classify(straight_through), labels, self.loss))
        return torch.stack(losses).mean(dim=0)
