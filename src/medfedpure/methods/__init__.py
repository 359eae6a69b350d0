"""The method registry: MedFedPure and the paper's six baselines on one federation.

Every method builds a classifier that maps [0,1] images to log p(y|x) and splits its state
into what travels (`experts.*`, averaged n_i-weighted per key by the server) and what stays
on the client (MedFedPure's gate, FedEM's mixture weights). A `Method` carries what differs
between them: its model, one local round, whether it runs the defense, how the report names
its training. The Flower apps, partitions, seeds and evaluation ask the method; nothing else
compares method names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from medfedpure.attacks import training_attack_label
from medfedpure.config import METHOD_NAMES, ExperimentConfig
from medfedpure.loop import channels_last
from medfedpure.methods import baselines, task
from medfedpure.methods.medfedpure import train_local
from medfedpure.models import LearnerMixture, build_model
from medfedpure.runfolder import RunFolder, config_fingerprint


class ScanStore(Protocol):
    """Where a client keeps pFedDef's adversarial scans between rounds (memory and its own disk)."""

    def load_scans(self, made_at: int) -> baselines.AdversarialSet | None: ...

    def save_scans(self, scans: baselines.AdversarialSet) -> None: ...


@dataclass
class LocalRound:
    """What a client's round needs beyond its model: who and when, and what it keeps."""

    cfg: ExperimentConfig
    client: int
    server_round: int
    purifier: nn.Module | None = None  # MedFedPure: the diffusion model, when the experts train through it
    store: ScanStore | None = None


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # as the paper's tables name it
    description: str
    defended: bool = False  # ours: the client-side defense (phases 1-2, defended evaluation, attack suite)
    adversarial: bool = False  # trains on PGD examples
    communicates: bool = True  # its experts travel (Local and Local Adv keep them)
    mixture: bool = False  # FedEM-style: K learners with per-client mixture weights
    reference: bool = False  # the robustness baseline every other method is paired with (McNemar): FAT

    def configure(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """The experiment as this method trains it (a baseline has no defense)."""
        out = ExperimentConfig.from_dict(cfg.to_dict())
        out.method.name = self.name
        out.train.rounds = out.method.rounds.get(self.name, out.train.rounds)  # its share of the time budget
        out.method.rounds = {}
        if not self.defended:  # nor what trains through it (phase 3's shares, phase 4)
            out.defense = dataclasses.replace(out.defense, enabled=False, purify_training=False, adv_share=0.0,
                                              adv_raw_share=0.0,
                                              purifier=dataclasses.replace(out.defense.purifier, rounds=0))
        return out.validate()

    def build(self, cfg: ExperimentConfig, num_classes: int) -> nn.Module:
        """The model this method trains (a `PersonalizedMoE` or a `LearnerMixture`)."""
        if self.defended:
            return build_model(cfg.model, num_classes)
        return LearnerMixture(num_classes, cfg.model, learners=self.num_models(cfg), shared=self.communicates)

    def num_models(self, cfg: ExperimentConfig) -> int:
        """K: experts or learners."""
        return cfg.model.num_experts if self.defended else cfg.method.learners if self.mixture else 1

    def folder(self, out: Path) -> Path:
        """Where an experiment keeps this method's run: ours in `out`, a baseline in `out/baselines/<name>`."""
        return Path(out) if self.defended else RunFolder(out).baseline(self.name).path

    def fingerprint(self, cfg: ExperimentConfig, phase: str) -> str:
        return config_fingerprint(cfg, phase, self.defended)

    def train_round(self, model: nn.Module, job: LocalRound) -> tuple[dict[str, float], int]:
        """One local round on the client's training split: (metrics, number of training scans), with
        the networks in channels-last layout while they train (`train.channels_last`); the model
        leaves in the default layout, so what it shares and saves is contiguous."""
        if not job.cfg.train.channels_last:
            return self._train_round(model, job)
        channels_last(model, *([job.purifier] if job.purifier is not None else []))
        try:
            return self._train_round(model, job)
        finally:
            model.to(memory_format=torch.contiguous_format)

    def _train_round(self, model: nn.Module, job: LocalRound) -> tuple[dict[str, float], int]:
        cfg, client, rnd = job.cfg, job.client, job.server_round
        if self.defended:
            loader = task.client_loaders(cfg, client, rnd)[0]
            return train_local(model, loader, cfg, rnd, job.purifier), len(loader.dataset)
        data, split = task.hospital(cfg, client)
        indices = split.train_idx
        lr, seed = task.round_lr(cfg, rnd), task.client_seed(cfg, client, rnd)
        if not self.mixture:
            share = cfg.method.adv_share if self.adversarial else 0.0
            return baselines.train_plain(model, data, indices, cfg, lr, seed, share, rnd), len(indices)
        scans = None
        if self.adversarial:  # the resource split needs every client's size: the federation-wide dataset
            scans = self._adversarial_scans(model, job, *task.data_and_splits(cfg), seed)
        return baselines.train_fedem(model, data, indices, cfg, lr, seed, scans, rnd), len(indices)

    def _adversarial_scans(self, model, job: LocalRound, data, splits, seed: int) -> baselines.AdversarialSet:
        """pFedDef's adversarial scans: made anew every Q rounds on this client's current model, else kept.
        Every client solves the same resource split from the partition sizes and caps in the config,
        so it needs no extra message."""
        cfg, rnd = job.cfg, job.server_round
        made_at = rnd - (rnd - 1) % cfg.method.adv_every
        if made_at != rnd and job.store is not None:
            kept = job.store.load_scans(made_at)
            if kept is not None:
                return kept
        share = baselines.adversarial_shares(cfg.method.adv_data_share, [len(s.train_idx) for s in splits],
                                             cfg.method.adv_resources)[job.client]
        scans = baselines.make_adversarial_set(model, data, splits[job.client].train_idx, cfg, seed, made_at, share)
        if job.store is not None:
            job.store.save_scans(scans)
        return scans

    def shared_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What travels to the server: `experts.*` only."""
        return model.expert_state()

    def own_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What stays on the client: the gate (ours), the mixture weights (FedEM), a local model's experts."""
        return model.gate_state()

    def training_note(self, cfg: ExperimentConfig) -> str:
        """How the report describes its training beyond the plain loss ('' for none)."""
        if not self.adversarial:
            return ""
        share = (f"G={cfg.method.adv_data_share:g} of scans every Q={cfg.method.adv_every} rounds" if self.mixture
                 else f"{cfg.method.adv_share:g} of each batch")
        return f"; trained on {training_attack_label(cfg)}, {share}"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("medfedpure", "MedFedPure", "personalized MoE (shared experts, local gate) + client-side defense",
           defended=True),
    Method("fedavg", "FedAvg", "one model, all weights averaged"),
    Method("local", "Local", "one model per client, no communication", communicates=False),
    Method("fedem", "FedEM", "K learners averaged per learner, per-client mixture weights pi (EM)", mixture=True),
    Method("fat", "FAT", "FedAvg with adversarial training (a share of every batch is PGD)", adversarial=True,
           reference=True),
    Method("local-adv", "Local Adv", "local training with adversarial training", adversarial=True,
           communicates=False),
    Method("pfeddef", "pFedDef", "FedEM + a share G of the training scans replaced by PGD every Q rounds",
           adversarial=True, mixture=True),
)}
assert tuple(METHODS) == METHOD_NAMES
OURS = next(m for m in METHODS.values() if m.defended)
REFERENCE = next(m for m in METHODS.values() if m.reference)  # "beats plain federated adversarial training"


def method_of(cfg: ExperimentConfig) -> Method:
    return METHODS[cfg.method.name]


def purifier_tag(cfg: ExperimentConfig) -> str | None:
    """Which U-Net the defense purifies with, for the records of what an evaluation used: phase 4's
    fingerprint where the config fine-tunes one, None for phase 1's (or a method without a defense)."""
    return fingerprint(cfg, "purifier") if cfg.defense.purifier.rounds > 0 and method_of(cfg).defended else None


def parse_methods(text: str) -> list[str]:
    """'all' or a comma-separated list, in the registry's order."""
    names = list(METHODS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown or [text]}; choose from {', '.join(METHODS)} or 'all'")
    return [m for m in METHODS if m in names]


def new_model(cfg: ExperimentConfig, n_classes: int, init_seed: int) -> nn.Module:
    """The classifier of the config's method, initialized from `init_seed`."""
    torch.manual_seed(init_seed)
    return method_of(cfg).build(cfg, n_classes).to(cfg.device)


def fingerprint(cfg: ExperimentConfig, phase: str) -> str:
    """The config fingerprint of a phase as the config's method trains it (resume and 'done' checks)."""
    return method_of(cfg).fingerprint(cfg, phase)


def private_phases(cfg: ExperimentConfig) -> dict[str, int]:
    """The phases whose models leave the hospitals under differential privacy as the config's method
    trains (`ExperimentConfig.private_phases`), with their rounds, in the order they run."""
    return cfg.private_phases(method_of(cfg).defended)


__all__ = ["METHODS", "OURS", "REFERENCE", "purifier_tag", "LocalRound", "Method", "ScanStore", "fingerprint", "method_of", "new_model",
           "parse_methods", "private_phases"]
