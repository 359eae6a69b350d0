"""Models: expert backbones and the personalized mixture of experts."""

from medfedpure.models.backbones import SmallCNN, build_backbone
from medfedpure.models.moe import PersonalizedMoE, build_model

__all__ = ["PersonalizedMoE", "SmallCNN", "build_backbone", "build_model"]
