"""Experiment configuration: dataclasses, YAML presets and `key=value` overrides.

One `ExperimentConfig` describes a whole run; it is saved next to the results so any
run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from medfedpure.attacks.base import LOSSES as ATTACK_LOSSES
from medfedpure.attacks.registry import NAME_HELP, SUITE, TRAINING_ATTACKS, valid_attack_name


class ConfigError(ValueError):
    """A preset, file or override that does not describe a valid experiment."""


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # synthetic | br35h | cifar10 | folder
    root: str | None = None  # folder with the images (not used by `synthetic`)
    image_size: int = 32
    num_clients: int = 3
    partition: str = "iid"  # iid | dirichlet
    dirichlet_alpha: float = 0.5
    min_client_size: int = 10  # dirichlet draws are repeated until every client has this many
    test_fraction: float = 0.2
    val_fraction: float = 0.0  # clean held-out scans per client, to calibrate the detector
    augment: bool = True
    # what training scans get when `augment`: mri (a small rotation, a flip, a brightness change) | cifar (a flip
    # and a translation of up to 2 pixels with reflected borders: the fast-CIFAR recipe, benchmarks/cifar_curve.py)
    augmentation: str = "mri"
    max_per_class: int | None = None  # optional subset (CPU-scale CIFAR-10)
    synthetic_per_class: int = 150
    cache_dir: str | None = None  # decoded-image cache; default ~/.cache/medfedpure
    # pooled: `root` is one dataset, cut into `num_clients` parts (the simulation's default);
    # hospitals: `root` holds one class-folder set per hospital, hospital-0 ... hospital-<n-1>;
    # hospital: `root` is this hospital's own class folders (a SuperNode's `data-dir`)
    layout: str = "pooled"
    classes: list[str] | None = None  # the federation's classes, in label order (hospital layouts)

    @property
    def training_augmentation(self) -> str | None:
        """The augmentation training scans get (None: none)."""
        return self.augmentation if self.augment else None


TRAIN_SCHEDULES = ("step", "linear")  # methods.task.round_schedule
AUGMENTATIONS = ("mri", "cifar")  # data.loaders.train_augmentation


BACKBONES = ("resnet18", "resnet9", "mobilenet_v2", "small_cnn")  # models.backbones.build_backbone


@dataclass
class ModelConfig:
    backbone: str = "small_cnn"  # resnet18 | resnet9 | mobilenet_v2 | small_cnn
    num_experts: int = 3
    head_hidden: int = 256
    attention_hidden: int = 64
    pretrained_weights: str | None = None  # local torchvision state-dict file, or "imagenet"
    small_input_stem: bool = False  # stride-1 stem for 32-px images (CIFAR-style), see backbones.py
    norm: str = "batch"  # batch | group (GroupNorm: no running statistics to average, see backbones.py)
    # resnet18's first-stage channels, resnet9's stem's (64: torchvision's and Page's; narrower: docs/results.md)
    width: int = 64
    beta: float = 1e-4  # L2 on attention nets (Eq. 9)
    gamma: float = 1e-2  # gate-entropy weight (Eq. 9)


@dataclass
class TrainConfig:
    rounds: int = 2
    local_epochs: int = 1
    batch_size: int = 32
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.01
    lr_decay: float = 1.0  # per round: round r trains at lr * lr_decay^(r-1)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False  # Nesterov momentum (sgd)
    label_smoothing: float = 0.0  # of the classifier's cross-entropy (the fast-CIFAR recipe: 0.2)
    # step: each round at lr * lr_decay^(r-1) | linear: a linear warm-up over the first `warmup` share of the
    # run's local steps (every round's, in order), then a linear decay to 0 at the last step of the last round
    schedule: str = "step"
    warmup: float = 0.2
    # a round's networks in channels-last layout (the experts, and the purifier behind the training attack):
    # 0.915x phase 3's epoch here (benchmarks: training_layout); float rounding, not bit-exact; not part of a run's fingerprint
    channels_last: bool = True


@dataclass
class AttackConfig:
    norm: str = "linf"  # linf | l2
    eps: float = 0.015
    alpha: float = 0.003
    steps: int = 7
    random_start: bool = True
    eval_every_round: bool = True
    max_eval_per_client: int | None = None  # cap on PGD test scans per client per round
    # the adaptive suite (`medfedpure evaluate --attack ...`): attacks that know the defense
    adaptive_steps: int = 50  # steps of eot-pgd, bpda, detector-aware, orthogonal (attack.steps stays the paper's PGD)
    eot: int = 4  # fresh purification draws averaged per gradient step
    loss: str = "ce"  # ce | margin: the loss of a suite attack that does not name its own
    detector_weight: float = 1.0  # detector-aware: weight of max(0, score / tau - 0.8)
    square_queries: int = 500  # Square: queries per scan (each one a defended forward pass, ~45 ms on 2 CPU cores)
    draws: int = 10  # a stochastic defense answers each attacked scan this many times (majority, worst of N:
    # DiffHammer, NeurIPS 2024, scores worst of 10 resubmissions)
    batch_size: int = 16  # scans attacked together by the suite (larger on a GPU)
    # the suite runs the classifier and the U-Net in channels-last layout, as `serve` does: faster
    # convolutions on CPU (benchmarks/results.json, defended_gradient), the same answers up to float rounding
    channels_last: bool = True
    # what `experiment` runs on every method's own test splits after training (empty: nothing)
    # (`name:loss` runs a gradient attack with that loss instead of attack.loss: the margin loss is
    # the stronger one against the Br35H defense, so both eot-pgd losses run by default)
    suite: list = field(default_factory=lambda: ["pgd", "eot-pgd", "eot-pgd:margin", "apgd:margin", "bpda",
                                                  "detector-aware", "orthogonal:margin", "square"])
    suite_max_per_client: int | None = 10  # scans per client the suite attacks, spread over its split
    # the headline with power: these attacks (e.g. both eot-pgd losses) and the suite's strongest on
    # `headline_max_per_client` scans of each client (null: its whole test split), a second own-test
    # evaluation (empty: none)
    headline: list = field(default_factory=list)
    headline_max_per_client: int | None = None
    # the convergence check: the same attacks at the suite's budget and at a stronger one
    # (eot-pgd:margin beside eot-pgd:margin@200x20) on the same scans, a third evaluation (empty: none)
    convergence: list = field(default_factory=list)
    convergence_max_per_client: int | None = 5


AGGREGATIONS = ("fedavg", "median", "trimmed-mean")  # their strategies: federation.strategy.ROBUST
MEAN = AGGREGATIONS[0]  # the plain (n-weighted) mean of the experts, the default rule


@dataclass
class FederationConfig:
    backend: str = "ray"
    num_cpus_per_client: int = 2
    num_gpus_per_client: float = 0.0  # with device: cuda, e.g. 1.0 (Ray hides the GPU from clients without it)
    num_threads: int = 2  # torch intra-op threads inside a ClientApp
    # a round goes on when at least this share of the clients answered (the failed ones are logged
    # and left out of the average); below it the run stops, keeping the last finished round
    min_fit_fraction: float = 0.5
    join_timeout_s: float = 600.0  # how long the server waits for every hospital to connect before round 1
    round_timeout_s: float = 6 * 3600.0  # how long a round waits for a hospital's answer
    rejoin_wait_s: float = 30.0  # before each round, how long to wait for a disconnected hospital to come back
    # how phase 3 combines the hospitals' experts: "fedavg" (n-weighted mean), or a robust rule against
    # a poisoned or broken hospital, per coordinate: "median" (Yin et al. 2018) or "trimmed-mean"
    # (int(trim_fraction x the hospitals that answered) cut from each tail: Flower's FedTrimmedAvg,
    # so fewer answers may cut fewer); the robust rules weigh every hospital alike
    aggregation: str = "fedavg"
    trim_fraction: float = 0.1
    # client-level differential privacy of phase 3's experts (federation/privacy.py): each hospital clips
    # its update to dp_clipping_norm, the server adds Gaussian noise of dp_noise_multiplier x that norm to
    # the average; dp_epsilon instead solves the noise multiplier for that epsilon at dp_delta over
    # every private round. Off (0 and null) by default. dp_pretraining: the defense's models that travel
    # (phase 1's U-Net, phase 2's MAE, phase 4's fine-tuned U-Net) released the same way, one
    # accountant over all their rounds and phase 3's (`ExperimentConfig.private_phases`)
    dp_noise_multiplier: float = 0.0
    dp_epsilon: float | None = None
    dp_clipping_norm: float = 1.0
    dp_delta: float = 1e-5
    dp_pretraining: bool = False

    @property
    def private(self) -> bool:
        return self.dp_noise_multiplier > 0 or self.dp_epsilon is not None


@dataclass
class PretrainConfig:
    """How a defense model (MAE or U-Net) is trained on clean scans: federated or pooled."""

    rounds: int = 2  # federated rounds (central mode trains rounds * local_epochs epochs)
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3


@dataclass
class MAESettings:
    embed_dim: int = 64
    depth: int = 2
    num_heads: int = 4
    decoder_embed_dim: int = 64
    decoder_depth: int = 1
    decoder_num_heads: int = 4
    patch_size: int | None = None  # None: 4 for 32 px, 16 for 224 px, else >= 8x8 patches
    mask_ratio: float = 0.75
    train: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass
class DiffusionSettings:
    hidden: int = 32  # the paper: 256
    levels: int = 4
    time_dim: int = 64
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    train_t_max: int | None = 300  # train only on t <= this (the purifier never goes deeper)
    train: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass
class PurifierSettings:
    """Phase 4 (off at rounds 0): federated adversarial fine-tuning of the U-Net after phase 3. Each
    hospital fine-tunes the shared U-Net so that its own classifier (experts + its gate, frozen)
    answers right on the purification of the training attack crafted through the purifier, and on
    purified clean scans, with the denoising loss kept so it stays a purifier (AToP, ADBM); FedAvg."""

    rounds: int = 0  # federated rounds (0: no phase 4)
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-4
    clean_weight: float = 1.0  # weight of the classifier's loss on purified clean scans
    denoise_weight: float = 1.0  # weight of the U-Net's own denoising loss (Eq. 16)
    # phase 4's training attack, where it should be stronger than phase 3's (AToP and ADBM fine-tune
    # against multi-step PGD): None keeps phase 3's (defense.adv_attack, method.adv_steps or attack.steps)
    adv_attack: str | None = None
    adv_steps: int | None = None

    def training_method(self, method: "MethodConfig") -> "MethodConfig":
        """The method settings phase 4's attack is built from: `method` with adv_attack / adv_steps
        replaced where these settings name them."""
        return dataclasses.replace(method, adv_attack=self.adv_attack or method.adv_attack,
                                   adv_steps=method.adv_steps if self.adv_steps is None else self.adv_steps)


# the detectors a defense may use, each built by defense.detectors.DETECTORS (which checks it has them all)
DETECTOR_NAMES = ("mae", "residual", "disagreement")


@dataclass
class DefenseConfig:
    enabled: bool = True
    training: str = "federated"  # federated | central (phases 1-2)
    detector: str = DETECTOR_NAMES[0]  # mae | residual | disagreement (defense.detectors.DETECTORS)
    mode: str = "selective"  # selective | graded | off
    rule: str = "threshold"  # threshold | rank
    kappa: float = 0.18  # rank rule: top share flagged (paper: 18% Br35H, 5% CIFAR-10)
    target_fpr: float = 0.05  # threshold rule: tau = this upper quantile of clean validation scores
    t_min: int = 20
    t_max: int = 100
    sampler: str = "ddim"  # ddim (few deterministic steps) | ddpm (the paper's full reverse)
    sampler_steps: int = 1
    votes: int = 1  # purifications per scan, class probabilities averaged
    purify_training: bool = False  # Algorithm 3's optional step: experts see purified scans
    # adversarial training with the purifier in the loop: this share of every phase-3 batch is
    # replaced by PGD crafted through purification (budget: method.adv_* or the attack's), then purified
    adv_share: float = 0.0
    # defense in depth: this share of every phase-3 batch is replaced by the same attack crafted on the
    # classifier alone (as FAT does) and left unpurified, so the experts also know raw adversarial scans
    adv_raw_share: float = 0.0
    # the attack of those shares (pgd | fgsm-rs | n-fgsm; budget: method.adv_*): None keeps method.adv_attack,
    # so the defense can train on one N-FGSM step while the baselines (FAT) keep PGD-k
    adv_attack: str | None = None
    eval_modes: list = field(default_factory=lambda: ["selective", "graded"])
    eval_detectors: list = field(default_factory=lambda: list(DETECTOR_NAMES))
    mae: MAESettings = field(default_factory=MAESettings)
    diffusion: DiffusionSettings = field(default_factory=DiffusionSettings)
    purifier: PurifierSettings = field(default_factory=PurifierSettings)

    def training_method(self, method: "MethodConfig") -> "MethodConfig":
        """The method settings phase 3's attacks for the defense are built from: `method` with
        adv_attack replaced where defense.adv_attack names one."""
        return dataclasses.replace(method, adv_attack=self.adv_attack or method.adv_attack)


METHOD_NAMES = ("medfedpure", "fedavg", "local", "fedem", "fat", "local-adv", "pfeddef")


@dataclass
class MethodConfig:
    """The federated method that trains the classifier (docs/design.md, Baselines). Only `medfedpure` uses the
    defense; the others are the paper's baselines, trained on the same federation."""

    name: str = "medfedpure"  # medfedpure | fedavg | local | fedem | fat | local-adv | pfeddef
    learners: int = 3  # FedEM / pFedDef: mixture components (each one backbone + head)
    adv_share: float = 0.5  # FAT / Local Adv: share of every training batch replaced by PGD examples
    adv_data_share: float = 0.4  # pFedDef G: share of the client's training scans replaced by PGD examples
    adv_every: int = 2  # pFedDef Q: rounds between regenerations (reference: 10 of its 150 rounds)
    # pFedDef resource caps R_i: the largest share of its scans client i can make adversarial
    # (one value for all, or one per client); null = no cap, every client replaces G
    adv_resources: float | list | None = None
    # adversarial training's attack (FAT, Local Adv, pFedDef, and MedFedPure's defense.adv_share):
    # pgd (k = adv_steps steps) | fgsm-rs (FGSM from a random start) | n-fgsm (N-FGSM): one gradient
    adv_attack: str = "pgd"
    adv_noise: float | None = None  # N-FGSM's noise half-width k (None: 2 eps)
    # adversarial-training budget; None takes the evaluation attack's value (the single-step
    # attacks' default step is their own: FGSM-RS 1.25 eps, N-FGSM eps)
    adv_norm: str | None = None
    adv_eps: float | None = None
    adv_alpha: float | None = None
    adv_steps: int | None = None
    # phase 3's rounds of the named methods where they differ from train.rounds, e.g. {fedavg: 100, fat: 25}:
    # one time budget for all methods (a method whose round costs k of FedAvg's gets about 1/k of its rounds;
    # the CIFAR presets). A method's run records its own rounds as train.rounds.
    rounds: dict[str, int] = field(default_factory=dict)


@dataclass
class ExperimentConfig:
    name: str = "demo"
    seed: int = 0
    device: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    method: MethodConfig = field(default_factory=MethodConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "ExperimentConfig":
        return _build(cls, raw, source)

    @classmethod
    def from_json(cls, text: str) -> "ExperimentConfig":
        return cls.from_dict(json.loads(text))

    def private_phases(self, defended: bool) -> dict[str, int]:
        """The phases whose models leave the hospitals under differential privacy, with their rounds,
        in the order they run: phase 3 ("train"), and with federation.dp_pretraining the defense's
        federated phases a `defended` method runs ("diffusion", "mae", and "purifier" where
        defense.purifier.rounds > 0). Empty without privacy."""
        if not self.federation.private:
            return {}
        d = self.defense
        pre = self.federation.dp_pretraining and defended and d.enabled and d.training == "federated"
        phases = {"diffusion": d.diffusion.train.rounds, "mae": d.mae.train.rounds} if pre else {}
        phases["train"] = self.train.rounds
        if pre and d.purifier.rounds > 0:
            phases["purifier"] = d.purifier.rounds
        return phases

    def adversarial_training_attack(self) -> AttackConfig:
        """The PGD budget adversarial training uses: method.adv_* where set, else the attack's."""
        m = self.method
        return dataclasses.replace(self.attack, norm=m.adv_norm or self.attack.norm,
                                   eps=self.attack.eps if m.adv_eps is None else m.adv_eps,
                                   alpha=self.attack.alpha if m.adv_alpha is None else m.adv_alpha,
                                   steps=self.attack.steps if m.adv_steps is None else m.adv_steps)

    def validate(self) -> "ExperimentConfig":
        checks = [
            (bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name)), "name",
             "letters, digits, '.', '_' and '-' (it names the run folder: no '/' or '..')"),
            (self.seed >= 0, "seed", ">= 0"),
            (self.data.dataset in {"synthetic", "br35h", "cifar10", "folder"}, "data.dataset",
             "one of synthetic, br35h, cifar10, folder"),
            (self.data.dataset == "synthetic" or self.data.layout == "hospital" or self.data.root, "data.root",
             f"a folder for dataset '{self.data.dataset}' (pass --data DIR)"),
            (self.data.image_size >= 8, "data.image_size", ">= 8"),
            (self.data.max_per_class is None or self.data.max_per_class >= 1, "data.max_per_class",
             ">= 1 or null (every image)"),
            (self.data.num_clients >= 1, "data.num_clients", ">= 1"),
            (self.data.layout in {"pooled", "hospitals", "hospital"}, "data.layout", "pooled, hospitals or hospital"),
            (self.data.layout != "hospitals" or self.data.root, "data.root",
             f"the hospitals' folder for data.layout={self.data.layout}"),
            (self.data.classes is None or len(set(self.data.classes)) == len(self.data.classes) >= 2,
             "data.classes", "two or more distinct class names"),
            (0 < self.federation.min_fit_fraction <= 1, "federation.min_fit_fraction", "in (0, 1]"),
            (self.federation.join_timeout_s > 0, "federation.join_timeout_s", "> 0"),
            (self.federation.round_timeout_s > 0, "federation.round_timeout_s", "> 0"),
            (self.federation.rejoin_wait_s >= 0, "federation.rejoin_wait_s", ">= 0"),
            (self.federation.aggregation in AGGREGATIONS, "federation.aggregation", f"one of {list(AGGREGATIONS)}"),
            (0 <= self.federation.trim_fraction < 0.5, "federation.trim_fraction", "in [0, 0.5)"),
            (self.federation.aggregation != "trimmed-mean"
             or int(self.federation.trim_fraction * self.data.num_clients) >= 1, "federation.trim_fraction",
             f"at least 1/data.num_clients = {1 / max(self.data.num_clients, 1):.3g}, so that the trimmed mean "
             "cuts at least one hospital from each tail"),
            (self.federation.dp_noise_multiplier >= 0, "federation.dp_noise_multiplier", ">= 0 (0: no privacy)"),
            (self.federation.dp_epsilon is None or self.federation.dp_epsilon > 0, "federation.dp_epsilon",
             "> 0 or null"),
            (self.federation.dp_epsilon is None or self.federation.dp_noise_multiplier == 0,
             "federation.dp_epsilon", "alone: it sets the noise multiplier (leave federation.dp_noise_multiplier 0)"),
            (self.federation.dp_clipping_norm > 0, "federation.dp_clipping_norm", "> 0"),
            (0 < self.federation.dp_delta < 1, "federation.dp_delta", "in (0, 1)"),
            (not self.federation.dp_pretraining or (self.federation.private and self.defense.training == "federated"),
             "federation.dp_pretraining", "only with differential privacy on (dp_epsilon or dp_noise_multiplier) "
             "and defense.training=federated (central pretraining pools the scans)"),
            (not self.federation.private or self.federation.aggregation == MEAN, "federation.aggregation",
             "fedavg with differential privacy (its noise is calibrated to a mean of clipped updates)"),
            (self.data.partition in {"iid", "dirichlet"}, "data.partition", "iid or dirichlet"),
            (self.data.dirichlet_alpha > 0, "data.dirichlet_alpha", "> 0"),
            (0 < self.data.test_fraction < 1, "data.test_fraction", "in (0, 1)"),
            (0 <= self.data.val_fraction < 1 - self.data.test_fraction, "data.val_fraction",
             "in [0, 1 - test_fraction)"),
            (self.model.backbone in BACKBONES, "model.backbone", "one of " + ", ".join(BACKBONES)),
            (self.model.num_experts >= 1, "model.num_experts", ">= 1"),
            (self.model.width >= 8 and self.model.width % 8 == 0, "model.width", "a multiple of 8, >= 8"),
            (self.model.width == 64 or self.model.backbone in {"resnet18", "resnet9"}, "model.width",
             "64 unless model.backbone is resnet18 or resnet9"),
            (self.model.width == 64 or not self.model.pretrained_weights, "model.width",
             "64 with model.pretrained_weights (the pretrained networks are full width)"),
            (self.train.rounds >= 1, "train.rounds", ">= 1"),
            (self.train.local_epochs >= 1, "train.local_epochs", ">= 1"),
            (self.train.batch_size >= 1, "train.batch_size", ">= 1"),
            (self.train.lr > 0, "train.lr", "> 0"),
            (self.train.weight_decay >= 0 and self.train.momentum >= 0, "train.weight_decay/momentum", ">= 0"),
            (self.train.optimizer in {"sgd", "adam"}, "train.optimizer", "sgd or adam"),
            (0 < self.train.lr_decay <= 1, "train.lr_decay", "in (0, 1]"),
            (self.train.schedule in TRAIN_SCHEDULES, "train.schedule", " or ".join(TRAIN_SCHEDULES)),
            (self.train.schedule == "step" or self.train.lr_decay == 1, "train.lr_decay",
             "1 with train.schedule=linear (the schedule decays the rate itself)"),
            (0 <= self.train.warmup < 1, "train.warmup", "in [0, 1)"),
            (0 <= self.train.label_smoothing < 1, "train.label_smoothing", "in [0, 1)"),
            (not self.train.nesterov or (self.train.optimizer == "sgd" and self.train.momentum > 0), "train.nesterov",
             "only with train.optimizer=sgd and train.momentum > 0"),
            (self.data.augmentation in AUGMENTATIONS, "data.augmentation", " or ".join(AUGMENTATIONS)),
            (self.attack.norm in {"linf", "l2"}, "attack.norm", "linf or l2"),
            (self.attack.eps >= 0 and self.attack.alpha >= 0, "attack.eps/alpha", ">= 0"),
            (self.attack.steps >= 0, "attack.steps", ">= 0"),
            (self.attack.max_eval_per_client is None or self.attack.max_eval_per_client >= 1,
             "attack.max_eval_per_client", ">= 1 or null (every test scan)"),
            (self.attack.adaptive_steps >= 0, "attack.adaptive_steps", ">= 0"),
            (self.attack.eot >= 1, "attack.eot", ">= 1"),
            (self.attack.loss in ATTACK_LOSSES, "attack.loss", "ce or margin"),
            (self.attack.detector_weight >= 0, "attack.detector_weight", ">= 0"),
            (self.attack.square_queries >= 1, "attack.square_queries", ">= 1"),
            (self.attack.draws >= 1, "attack.draws", ">= 1"),
            (self.attack.batch_size >= 1, "attack.batch_size", ">= 1"),
            *[(isinstance(getattr(self.attack, kind), list)
               and all(valid_attack_name(a) for a in getattr(self.attack, kind)), f"attack.{kind}",
               f"a list of {', '.join(SUITE)} ({NAME_HELP})") for kind in ("suite", "headline", "convergence")],
            *[(getattr(self.attack, f"{kind}_max_per_client") is None or getattr(self.attack, f"{kind}_max_per_client")
               >= 1, f"attack.{kind}_max_per_client", ">= 1 or null (every scan)")
              for kind in ("suite", "headline", "convergence")],
            (self.defense.training in {"federated", "central"}, "defense.training", "federated or central"),
            (self.defense.detector in DETECTOR_NAMES, "defense.detector", "one of " + ", ".join(DETECTOR_NAMES)),
            (isinstance(self.defense.eval_detectors, list) and set(self.defense.eval_detectors) <= set(DETECTOR_NAMES),
             "defense.eval_detectors", "a list of " + ", ".join(DETECTOR_NAMES)),
            (self.defense.mode in {"selective", "graded", "off"}, "defense.mode", "selective, graded or off"),
            (self.defense.rule in {"threshold", "rank"}, "defense.rule", "threshold or rank"),
            (0 < self.defense.kappa < 1, "defense.kappa", "in (0, 1)"),
            (0 < self.defense.target_fpr < 1, "defense.target_fpr", "in (0, 1)"),
            (0 <= self.defense.t_min <= self.defense.t_max <= self.defense.diffusion.timesteps,
             "defense.t_min/t_max", "0 <= t_min <= t_max <= diffusion.timesteps"),
            (self.defense.sampler in {"ddim", "ddpm"}, "defense.sampler", "ddim or ddpm"),
            (self.defense.sampler_steps >= 1, "defense.sampler_steps", ">= 1"),
            (self.defense.votes >= 1, "defense.votes", ">= 1"),
            (0 <= self.defense.adv_share <= 1, "defense.adv_share", "in [0, 1]"),
            (self.defense.adv_share == 0 or self.defense.purify_training, "defense.adv_share",
             "0 unless defense.purify_training is on (the purifier is what the attack goes through)"),
            (0 <= self.defense.adv_raw_share <= 1 - self.defense.adv_share, "defense.adv_raw_share",
             "in [0, 1 - defense.adv_share]"),
            (self.defense.adv_raw_share == 0 or self.defense.purify_training, "defense.adv_raw_share",
             "0 unless defense.purify_training is on (it is the defended training batch's raw part)"),
            (0 < self.defense.mae.mask_ratio < 1, "defense.mae.mask_ratio", "in (0, 1)"),
            (self.defense.purifier.rounds >= 0, "defense.purifier.rounds", ">= 0 (0: no fine-tuning)"),
            (self.defense.purifier.local_epochs >= 1 and self.defense.purifier.batch_size >= 1
             and self.defense.purifier.lr > 0, "defense.purifier", "local_epochs, batch_size >= 1 and lr > 0"),
            (self.defense.purifier.rounds == 0 or self.defense.purify_training, "defense.purifier.rounds",
             "0 unless defense.purify_training is on (the experts must know purified scans)"),
            (self.defense.adv_attack in (None, *TRAINING_ATTACKS), "defense.adv_attack",
             "null (method.adv_attack) or one of " + ", ".join(TRAINING_ATTACKS)),
            (self.defense.purifier.adv_attack in (None, *TRAINING_ATTACKS), "defense.purifier.adv_attack",
             "null (phase 3's attack) or one of " + ", ".join(TRAINING_ATTACKS)),
            (all(a not in TRAINING_ATTACKS or not TRAINING_ATTACKS[a].linf_only
                 or (self.method.adv_norm or self.attack.norm) == "linf"
                 for a in (self.defense.adv_attack, self.defense.purifier.adv_attack)),
             "defense.adv_attack/defense.purifier.adv_attack",
             "one without an l_inf-only budget unless adversarial training's norm is linf"),
            (self.defense.purifier.adv_steps is None or self.defense.purifier.adv_steps >= 1,
             "defense.purifier.adv_steps", "null or >= 1"),
            (self.defense.purifier.clean_weight >= 0 and self.defense.purifier.denoise_weight >= 0,
             "defense.purifier.clean_weight/denoise_weight", ">= 0"),
            (self.model.norm in {"batch", "group"}, "model.norm", "batch or group"),
            (self.method.name in METHOD_NAMES, "method.name", "one of " + ", ".join(METHOD_NAMES)),
            (self.method.learners >= 1, "method.learners", ">= 1"),
            (0 <= self.method.adv_share <= 1, "method.adv_share", "in [0, 1]"),
            (0 <= self.method.adv_data_share <= 1, "method.adv_data_share", "in [0, 1]"),
            (self.method.adv_every >= 1, "method.adv_every", ">= 1"),
            (set(self.method.rounds) <= set(METHOD_NAMES), "method.rounds",
             "a mapping from method names (" + ", ".join(METHOD_NAMES) + ") to rounds"),
            (all(r >= 1 for r in self.method.rounds.values()), "method.rounds", "rounds >= 1 for every method"),
            (_valid_resources(self.method.adv_resources, self.data.num_clients), "method.adv_resources",
             "null, a share in [0, 1], or one such share per client (data.num_clients of them)"),
            (self.method.adv_norm in {None, "linf", "l2"}, "method.adv_norm", "linf, l2 or null"),
            (self.method.adv_attack in TRAINING_ATTACKS, "method.adv_attack", "one of " + ", ".join(TRAINING_ATTACKS)),
            (self.method.adv_attack not in TRAINING_ATTACKS or not TRAINING_ATTACKS[self.method.adv_attack].linf_only
             or (self.method.adv_norm or self.attack.norm) == "linf", "method.adv_attack",
             "one without an l_inf-only budget unless adversarial training's norm is linf (l_inf only: "
             + ", ".join(n for n, t in TRAINING_ATTACKS.items() if t.linf_only) + ")"),
            (self.method.adv_noise is None or self.method.adv_noise >= 0, "method.adv_noise", ">= 0 or null"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"config field '{name}' must be {expected}")
        return self


def _valid_resources(caps: float | list | None, num_clients: int) -> bool:
    if caps is None:
        return True
    values = caps if isinstance(caps, list) else [caps]
    if isinstance(caps, list) and len(caps) != num_clients:
        return False
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in values)


def _build(cls: type, raw: dict[str, Any], source: str, prefix: str = "") -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix or 'top level'}' must be a mapping")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{source}: unknown field(s) {', '.join(where + u for u in unknown)}")
    kwargs = {}
    for name, value in raw.items():
        where = f"{prefix}.{name}" if prefix else name
        section = _SECTIONS.get(str(known[name].type))
        kwargs[name] = _build(section, value, source, where) if section else _typed(value, str(known[name].type),
                                                                                       where, source)
    return cls(**kwargs)


_SCALARS = {"int": int, "float": float, "str": str, "bool": bool, "list": list}


def _typed(value: Any, annotation: str, name: str, source: str) -> Any:
    """Check a scalar against its field's annotation ("int", "str | None", ...); ints pass as floats."""
    options = [a.strip() for a in annotation.split("|")]
    if value is None and "None" in options:
        return value
    for opt in options:
        if opt == "list[str]" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        if opt == "dict[str, int]" and isinstance(value, dict) and all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in value.items()):
            return dict(value)
        kind = _SCALARS.get(opt)
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool, list) and isinstance(value, kind):
            return value
    hint = ""
    if "list[str]" in options and isinstance(value, list) and any(isinstance(v, bool) for v in value):
        hint = " (YAML reads no/yes/on/off as booleans: quote the names, e.g. ['no','yes'])"
    raise ConfigError(f"{source}: field '{name}' must be {annotation}, not {value!r}{hint}")


_SECTIONS: dict[str, type] = {c.__name__: c for c in (
    DataConfig, ModelConfig, TrainConfig, AttackConfig, FederationConfig, PretrainConfig, MAESettings,
    DiffusionSettings, PurifierSettings, DefenseConfig, MethodConfig)}


def preset_names() -> list[str]:
    folder = resources.files("medfedpure") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


MAX_YAML_BYTES = 1_000_000  # a preset or study spec is a few KB; nothing we read needs more
MAX_YAML_VALUES = 100_000  # values (nodes) in one document


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases (`*name`: a few hundred bytes of nested aliases expand to
    gigabytes, the "billion laughs") and with at most MAX_YAML_VALUES values, so parsing takes bounded
    time and memory. Anchors alone are harmless and allowed."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"YAML aliases (*name) are not allowed here (line {mark.line + 1})")
        self.values = getattr(self, "values", 0) + 1
        if self.values > MAX_YAML_VALUES:
            raise yaml.YAMLError(f"more than {MAX_YAML_VALUES:,} values")
        return super().compose_node(parent, index)


# YAML 1.1 (PyYAML) reads 3e-4 and 1e3 as strings; YAML 1.2 and every user read them as numbers
_BoundedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(text: str, source: str) -> Any:
    """One YAML document from untrusted text, bounded (size, values, no aliases); ConfigError naming
    `source` for anything that is not such a document."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{source}: {len(text):,} characters, more than the {MAX_YAML_BYTES:,} a config may have")
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, UnicodeError, ValueError) as err:
        raise ConfigError(f"{source}: not valid YAML ({str(err).strip().splitlines()[0] if str(err) else err!r})") from err


def read_yaml_file(path: Path, what: str) -> Any:
    """`load_yaml` of a file, with one clear error for a folder, an oversized or an unreadable file."""
    if path.is_dir():
        raise ConfigError(f"{what} '{path}' is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{what} '{path}': {path.stat().st_size:,} bytes, more than the {MAX_YAML_BYTES:,} "
                          "a config may have")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} '{path}' cannot be read as UTF-8 text ({err})") from err
    return load_yaml(text, f"{what} '{path}'")


def load_preset(name: str) -> ExperimentConfig:
    """A built-in preset by name, or a YAML file by path."""
    path = Path(name)
    if path.suffix in {".yaml", ".yml"} and path.exists():
        return ExperimentConfig.from_dict(read_yaml_file(path, "preset") or {}, str(path))
    candidate = resources.files("medfedpure") / "presets" / f"{name}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())} "
                          "or give a path to a YAML file")
    text, source = candidate.read_text(), f"preset {name}"
    return ExperimentConfig.from_dict(load_yaml(text, source) or {}, source)


def apply_overrides(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """Apply `section.field=value` overrides; values are parsed as YAML scalars."""
    raw = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {item!r}: unknown section {part!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override {item!r}: unknown field {key!r}")
        node[parts[-1]] = load_yaml(value, f"override {item!r}")
    return ExperimentConfig.from_dict(raw, "overrides")
