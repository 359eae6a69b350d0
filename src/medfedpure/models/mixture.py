"""The baselines' classifier (docs/design.md, Baselines): K learners mixed by one weight vector per client.

FedEM and pFedDef use K learners and mixture weights pi that never leave the client;
FedAvg, FAT, Local and Local Adv are the K=1 case (pi = 1: a plain classifier). The
learners are the same `Expert` (backbone + head) as MedFedPure's, so every method
compares the same networks. Like `PersonalizedMoE`, the model maps [0,1] images to
log p(y|x) and splits its state into what travels (`expert_state`, keyed `experts.*`)
and what stays (`gate_state`: pi, or the whole model for the methods that never share).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medfedpure.config import ModelConfig
from medfedpure.models.backbones import build_backbone
from medfedpure.models.moe import Expert, Normalize


class LearnerMixture(nn.Module):
    def __init__(self, num_classes: int, cfg: ModelConfig, learners: int = 1, shared: bool = True) -> None:
        super().__init__()
        self.normalize = Normalize()
        experts = []
        for _ in range(learners):
            backbone, dim = build_backbone(cfg.backbone, cfg.pretrained_weights, cfg.small_input_stem, cfg.norm,
                                           cfg.width)
            experts.append(Expert(backbone, dim, num_classes, cfg.head_hidden))
        self.experts = nn.ModuleList(experts)
        # log pi, uniform at the start (FedEM's initial learners_weights)
        self.register_buffer("log_pi", torch.full((learners,), -math.log(learners)))
        self.shared = shared
        self.num_classes = num_classes

    @property
    def num_learners(self) -> int:
        return len(self.experts)

    def learner_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, C) logits of every learner."""
        z = self.normalize(x)
        return torch.stack([expert(z)[1] for expert in self.experts], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """log sum_m pi_m softmax(f_m(x)): FedEM's prediction, a plain log-softmax when K=1."""
        log_p = F.log_softmax(self.learner_logits(x), dim=-1)
        return torch.logsumexp(self.log_pi.view(1, -1, 1) + log_p, dim=1)

    def learner_losses(self, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """(B, K) cross-entropy of each learner on each sample (with `label_smoothing`, against smoothed
        targets: for training only; FedEM's E-step needs the likelihood)."""
        logits = self.learner_logits(x)
        b, k, c = logits.shape
        return F.cross_entropy(logits.reshape(b * k, c), y.repeat_interleave(k), reduction="none",
                               label_smoothing=label_smoothing).view(b, k)

    def loss(self, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean over samples of sum_m q_m * CE_m (FedEM's M-step); with K=1 and no q, plain cross-entropy
        (`label_smoothing`: against smoothed targets, train.label_smoothing)."""
        losses = self.learner_losses(x, y, label_smoothing)
        if weights is None:
            weights = self.log_pi.exp().expand_as(losses) if self.num_learners > 1 else torch.ones_like(losses)
        total = (weights * losses).sum(dim=1).mean()
        return total, {"nll": total.item(), "gate_entropy": 0.0}

    # ---- what travels and what stays
    def expert_state(self) -> dict[str, torch.Tensor]:
        """The learners, keyed `experts.*`; nothing for the methods without communication."""
        if not self.shared:
            return {}
        return {k: v for k, v in self.state_dict().items() if k.startswith("experts.")}

    def gate_state(self) -> dict[str, torch.Tensor]:
        """What never leaves the client: pi, plus the learners themselves when nothing is shared."""
        if not self.shared:
            return dict(self.state_dict())
        return {"log_pi": self.log_pi.detach().clone()}

    def load_experts(self, state: dict[str, torch.Tensor]) -> None:
        own = self.expert_state()
        if set(state) != set(own):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise KeyError(f"learner weights do not match the model (missing {missing[:3]}, extra {extra[:3]})")
        if state:
            self.load_state_dict(state, strict=False)

    def load_gate(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.gate_state()):
            raise KeyError("personal weights do not match the model (another method or number of learners?)")
        self.load_state_dict(state, strict=not self.shared)
