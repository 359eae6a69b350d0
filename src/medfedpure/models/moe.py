"""Personalized mixture of experts (docs/design.md, The classifier; paper Eq. 4-10).

Experts (backbone + head) are shared through federated averaging; the attention nets
that form the gate stay on the client. The model maps [0,1] images to log p(y|x), which
serves as the logits for attacks and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medfedpure.config import ModelConfig
from medfedpure.models.backbones import build_backbone


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """ImageNet normalisation inside the model, so callers (and attacks) work in [0,1]."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Expert(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(x)
        return h, self.head(h)


@dataclass
class MoEOutput:
    log_probs: torch.Tensor  # (B, C) log p(y|x) of the mixture
    gate: torch.Tensor  # (B, K) alpha(x)
    expert_logits: torch.Tensor  # (B, K, C)


class PersonalizedMoE(nn.Module):
    def __init__(self, num_classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.normalize = Normalize()
        experts, attention = [], []
        for _ in range(cfg.num_experts):
            backbone, dim = build_backbone(cfg.backbone, cfg.pretrained_weights, cfg.small_input_stem, cfg.norm,
                                           cfg.width)
            experts.append(Expert(backbone, dim, num_classes, cfg.head_hidden))
            attention.append(nn.Sequential(nn.Linear(dim, cfg.attention_hidden), nn.ReLU(inplace=True),
                                           nn.Linear(cfg.attention_hidden, 1)))
        self.experts = nn.ModuleList(experts)
        self.attention = nn.ModuleList(attention)
        self.beta = cfg.beta
        self.gamma = cfg.gamma
        self.num_classes = num_classes

    def details(self, x: torch.Tensor) -> MoEOutput:
        z = self.normalize(x)
        scores, logits = [], []
        for expert, att in zip(self.experts, self.attention):
            h, out = expert(z)
            scores.append(att(h))
            logits.append(out)
        gate_logits = torch.cat(scores, dim=1)
        expert_logits = torch.stack(logits, dim=1)
        log_gate = F.log_softmax(gate_logits, dim=1)
        # log sum_k alpha_k softmax(f_k): a mixture of class probabilities, computed stably
        log_probs = torch.logsumexp(log_gate.unsqueeze(-1) + F.log_softmax(expert_logits, dim=-1), dim=1)
        return MoEOutput(log_probs, log_gate.exp(), expert_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.details(x).log_probs

    def loss(self, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Eq. 9: mixture NLL + beta * sum_k ||phi_k||^2 + gamma * H(alpha(x)); with `label_smoothing` e
        (train.label_smoothing), the NLL is against smoothed targets: (1 - e) * NLL + e * the mean over
        classes of -log p(c | x), what F.cross_entropy's label_smoothing does with logits."""
        out = self.details(x)
        nll = F.nll_loss(out.log_probs, y)
        if label_smoothing:
            nll = (1 - label_smoothing) * nll - label_smoothing * out.log_probs.mean(dim=1).mean()
        l2 = sum((p ** 2).sum() for p in self.attention.parameters())
        entropy = -(out.gate * out.gate.clamp_min(1e-12).log()).sum(dim=1).mean()
        total = nll + self.beta * l2 + self.gamma * entropy
        return total, {"nll": nll.item(), "attention_l2": float(l2.detach()), "gate_entropy": entropy.item()}

    # ---- what travels and what stays
    def expert_state(self) -> dict[str, torch.Tensor]:
        """Expert parameters and BatchNorm buffers, keyed `experts.*`: the only part shared."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("experts.")}

    def gate_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith("attention.")}

    def load_experts(self, state: dict[str, torch.Tensor]) -> None:
        own = self.expert_state()
        if set(state) != set(own):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise KeyError(f"expert weights do not match the model (missing {missing[:3]}, extra {extra[:3]})")
        self.load_state_dict(state, strict=False)

    def load_gate(self, state: dict[str, torch.Tensor]) -> None:
        own = self.gate_state()
        if set(state) != set(own):
            raise KeyError("gate weights do not match the model's attention nets")
        self.load_state_dict(state, strict=False)


def build_model(cfg: ModelConfig, num_classes: int) -> PersonalizedMoE:
    return PersonalizedMoE(num_classes, cfg)
