"""Models: expert backbones and the personalized mixture of experts."""

from medfedpure.models.backbones import SmallCNN, build_backbone
from medfedpure.models.mixture import LearnerMixture
from medfedpure.models.moe import PersonalizedMoE, build_model

__all__ = ["LearnerMixture", "PersonalizedMoE", "SmallCNN", "build_backbone", "build_model"]
