"""The method registry: MedFedPure and the paper's six baselines on one federation.

Every method builds a classifier that maps [0,1] images to log p(y|x) and splits its
state into what travels (`experts.*`, averaged n_i-weighted per key by the server) and
what stays on the client; the Flower apps, partitions, seeds and evaluation are shared.
"""

from __future__ import annotations

from dataclasses import dataclass

from medfedpure.config import METHOD_NAMES, ExperimentConfig


@dataclass(frozen=True)
class MethodInfo:
    name: str
    label: str  # as the paper's tables name it
    description: str


METHODS: dict[str, MethodInfo] = {m.name: m for m in (
    MethodInfo("medfedpure", "MedFedPure", "personalized MoE (shared experts, local gate) + client-side defense"),
    MethodInfo("fedavg", "FedAvg", "one model, all weights averaged"),
    MethodInfo("local", "Local", "one model per client, no communication"),
    MethodInfo("fedem", "FedEM", "K learners averaged per learner, per-client mixture weights pi (EM)"),
    MethodInfo("fat", "FAT", "FedAvg with adversarial training (a share of every batch is PGD)"),
    MethodInfo("local-adv", "Local Adv", "local training with adversarial training"),
    MethodInfo("pfeddef", "pFedDef", "FedEM + a share G of the training scans replaced by PGD every Q rounds"),
)}
assert tuple(METHODS) == METHOD_NAMES


def parse_methods(text: str) -> list[str]:
    """'all' or a comma-separated list, in the registry's order."""
    names = list(METHODS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown or [text]}; choose from {', '.join(METHODS)} or 'all'")
    return [m for m in METHODS if m in names]


def build_classifier(cfg: ExperimentConfig, num_classes: int):
    """The model the config's method trains (a `PersonalizedMoE` or a `LearnerMixture`)."""
    from medfedpure.models import LearnerMixture, build_model

    name = cfg.method.name
    if name == "medfedpure":
        return build_model(cfg.model, num_classes)
    learners = cfg.method.learners if name in {"fedem", "pfeddef"} else 1
    return LearnerMixture(num_classes, cfg.model, learners=learners, shared=cfg.method.communicates)


__all__ = ["METHODS", "MethodInfo", "build_classifier", "parse_methods"]
