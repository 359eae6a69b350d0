"""Experiment configuration: dataclasses, YAML presets and `key=value` overrides.

One `ExperimentConfig` describes a whole run; it is saved next to the results so any
run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


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
    augment: bool = True
    max_per_class: int | None = None  # optional subset (CPU-scale CIFAR-10)
    synthetic_per_class: int = 150
    cache_dir: str | None = None  # decoded-image cache; default ~/.cache/medfedpure


@dataclass
class ModelConfig:
    backbone: str = "small_cnn"  # resnet18 | mobilenet_v2 | small_cnn
    num_experts: int = 3
    head_hidden: int = 256
    attention_hidden: int = 64
    pretrained_weights: str | None = None  # local torchvision state-dict file, or "imagenet"
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


@dataclass
class AttackConfig:
    norm: str = "linf"  # linf | l2
    eps: float = 0.015
    alpha: float = 0.003
    steps: int = 7
    random_start: bool = True
    eval_every_round: bool = True
    max_eval_per_client: int | None = None  # cap on PGD test scans per client per round


@dataclass
class FederationConfig:
    backend: str = "ray"
    num_cpus_per_client: int = 2
    num_threads: int = 2  # torch intra-op threads inside a ClientApp


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

    def validate(self) -> "ExperimentConfig":
        checks = [
            (self.data.dataset in {"synthetic", "br35h", "cifar10", "folder"}, "data.dataset",
             "one of synthetic, br35h, cifar10, folder"),
            (self.data.dataset == "synthetic" or self.data.root, "data.root",
             f"a folder for dataset '{self.data.dataset}' (pass --data DIR)"),
            (self.data.image_size >= 8, "data.image_size", ">= 8"),
            (self.data.num_clients >= 1, "data.num_clients", ">= 1"),
            (self.data.partition in {"iid", "dirichlet"}, "data.partition", "iid or dirichlet"),
            (self.data.dirichlet_alpha > 0, "data.dirichlet_alpha", "> 0"),
            (0 < self.data.test_fraction < 1, "data.test_fraction", "in (0, 1)"),
            (self.model.backbone in {"resnet18", "mobilenet_v2", "small_cnn"}, "model.backbone",
             "one of resnet18, mobilenet_v2, small_cnn"),
            (self.model.num_experts >= 1, "model.num_experts", ">= 1"),
            (self.train.rounds >= 1, "train.rounds", ">= 1"),
            (self.train.local_epochs >= 1, "train.local_epochs", ">= 1"),
            (self.train.optimizer in {"sgd", "adam"}, "train.optimizer", "sgd or adam"),
            (0 < self.train.lr_decay <= 1, "train.lr_decay", "in (0, 1]"),
            (self.attack.norm in {"linf", "l2"}, "attack.norm", "linf or l2"),
            (self.attack.eps >= 0 and self.attack.alpha >= 0, "attack.eps/alpha", ">= 0"),
            (self.attack.steps >= 0, "attack.steps", ">= 0"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"config field '{name}' must be {expected}")
        return self


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig,
                             "attack": AttackConfig, "federation": FederationConfig}


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
        section = SECTIONS.get(name) if cls is ExperimentConfig else None
        if section:
            kwargs[name] = _build(section, value, source, name)
        else:
            kwargs[name] = _typed(value, str(known[name].type), f"{prefix}.{name}" if prefix else name, source)
    return cls(**kwargs)


_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def _typed(value: Any, annotation: str, name: str, source: str) -> Any:
    """Check a scalar against its field's annotation ("int", "str | None", ...); ints pass as floats."""
    options = [a.strip() for a in annotation.split("|")]
    if value is None and "None" in options:
        return value
    for opt in options:
        kind = _SCALARS.get(opt)
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool) and isinstance(value, kind):
            return value
    raise ConfigError(f"{source}: field '{name}' must be {annotation}, not {value!r}")


def preset_names() -> list[str]:
    folder = resources.files("medfedpure") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> ExperimentConfig:
    """A built-in preset by name, or a YAML file by path."""
    path = Path(name)
    if path.suffix in {".yaml", ".yml"} and path.exists():
        text, source = path.read_text(), str(path)
    else:
        candidate = resources.files("medfedpure") / "presets" / f"{name}.yaml"
        if not candidate.is_file():
            raise ConfigError(f"unknown preset '{name}'; choose one of {', '.join(preset_names())} "
                              "or give a path to a YAML file")
        text, source = candidate.read_text(), f"preset {name}"
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({err})") from err
    return ExperimentConfig.from_dict(raw, source)


def apply_overrides(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """Apply `section.field=value` overrides; values are parsed as YAML scalars."""
    raw = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.field=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override '{item}': unknown section '{part}'")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override '{item}': unknown field '{key}'")
        node[parts[-1]] = yaml.safe_load(value)
    return ExperimentConfig.from_dict(raw, "overrides")
