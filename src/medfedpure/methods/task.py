"""What a hospital has and does whatever the method (Flower's task.py): its scans and their
split, its seeds, the round's learning rate, and the test of a model on its test split."""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from medfedpure.attacks import make_pgd
from medfedpure.config import ExperimentConfig
from medfedpure.data import (BR35H_CLASSES, ClientSplit, DataError, ImageSet, check_splits, hospital_split,
                             load_dataset, load_hospital_folder, make_client_splits, make_loader)
from medfedpure.data.datasets import cap_per_class
from medfedpure.metrics import evaluate_accuracy


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


CLIENT_STRIDE = 10_007
# One seed namespace (docs/design.md, Seeds): a hospital's seed for a purpose is
#   cfg.seed * 1_000_003 + client * CLIENT_STRIDE + start + index,   0 <= index < size,
# and the purposes' offsets (start .. start + size - 1) fall in disjoint ranges modulo CLIENT_STRIDE, so no
# seed of one purpose or hospital is ever another's (tests/test_task.py checks it). (start, size) by purpose:
SEEDS = {
    "round": (0, 5_000),  # a hospital's training round (model init: round 0; augmentation; its PGD test)
    "finetune": (5_000, 1_000),  # phase 4's rounds, and its evaluation (index 0)
    "transfer": (6_000, 2_000),  # the transfer matrix: purification noise per (attacker, clean or attacked)
    "suite": (30_000, 1),  # the attack suite (its attacks take sub-streams of it: evaluation.robustness)
    "evaluate": (20_000, 1),  # the paper-protocol evaluation of a trained run
    "defense": (10_000, 1),  # the defended classifier's detector and purification noise (runs, bundles)
}


def client_seed(cfg: ExperimentConfig, client: int, index: int = 0, purpose: str = "round") -> int:
    """Hospital `client`'s seed for `purpose` (SEEDS), its `index`-th (a round, a cell)."""
    start, size = SEEDS[purpose]
    if not 0 <= index < size:
        raise ValueError(f"seed index {index} is outside purpose '{purpose}' (0..{size - 1})")
    return cfg.seed * 1_000_003 + client * CLIENT_STRIDE + start + index


_CACHE: dict[tuple[str, int], tuple[ImageSet, list[ClientSplit]]] = {}
_HOSPITALS: dict[tuple[str, int, int], tuple[ImageSet, ClientSplit]] = {}


def data_and_splits(cfg: ExperimentConfig, progress: bool = False) -> tuple[ImageSet, list[ClientSplit]]:
    """The dataset and every client's split; kept per process for the last two datasets (a Ray
    actor serves many clients). `progress`: a bar while images are decoded the first time.
    With `data.layout=hospitals` it is every hospital's own folder, one after the other."""
    key = (ExperimentConfig(data=cfg.data).to_json(), cfg.seed)
    if key not in _CACHE:
        if cfg.data.layout == "hospital":
            raise ValueError("data.layout=hospital names one hospital's folder: there is no federation-wide dataset")
        if cfg.data.layout == "hospitals":
            data, splits = _joined_hospitals(cfg, progress)
        else:
            data = load_dataset(cfg.data, seed=cfg.seed, progress=progress)
            splits = make_client_splits(data.labels, cfg.data.num_clients, cfg.data.partition,
                                        cfg.data.dirichlet_alpha, cfg.data.test_fraction, cfg.seed,
                                        cfg.data.min_client_size, cfg.data.val_fraction)
        while len(_CACHE) >= 2:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = (data, splits)
    return _CACHE[key]


def hospital(cfg: ExperimentConfig, client: int, progress: bool = False) -> tuple[ImageSet, ClientSplit]:
    """One client's scans and its train/validation/test split. On a SuperNode (`data.layout=hospital`)
    and with `data.layout=hospitals`, that is the hospital's own folder alone, split the same way."""
    if cfg.data.layout == "pooled":
        data, splits = data_and_splits(cfg, progress)
        return data, splits[client]
    key = (ExperimentConfig(data=cfg.data).to_json(), cfg.seed, client)
    if key not in _HOSPITALS:
        data = load_hospital_folder(hospital_folder(cfg, client), cfg.data.image_size, federation_classes(cfg),
                                    cfg.data.cache_dir, progress)
        if cfg.data.max_per_class:
            data = cap_per_class(data, cfg.data.max_per_class, cfg.seed + client)
        split = hospital_split(np.arange(len(data)), data.labels, client, cfg.data.test_fraction, cfg.seed,
                               cfg.data.val_fraction)
        check_splits([split], 1, cfg.data.val_fraction)
        while len(_HOSPITALS) >= 16:
            _HOSPITALS.pop(next(iter(_HOSPITALS)))
        _HOSPITALS[key] = (data, split)
    return _HOSPITALS[key]


def hospital_folder(cfg: ExperimentConfig, client: int) -> Path:
    root = Path(cfg.data.root or "").expanduser()
    return root if cfg.data.layout == "hospital" else root / f"hospital-{client}"


def federation_classes(cfg: ExperimentConfig) -> tuple[str, ...] | None:
    """The class names every hospital must have, when the config fixes them."""
    if cfg.data.classes:
        return tuple(cfg.data.classes)
    return BR35H_CLASSES if cfg.data.dataset == "br35h" else None


def _joined_hospitals(cfg: ExperimentConfig, progress: bool) -> tuple[ImageSet, list[ClientSplit]]:
    """Every hospital's folder as one set, each split as `hospital` splits it."""
    root = Path(cfg.data.root or "").expanduser()
    found = sorted(p.name for p in root.glob("hospital-*") if p.is_dir()) if root.is_dir() else []
    expected = [f"hospital-{i}" for i in range(cfg.data.num_clients)]
    if sorted(expected) != found:
        raise DataError(f"data folder '{root}' must hold exactly {', '.join(expected)} for data.layout=hospitals "
                        f"and data.num_clients={cfg.data.num_clients} (found: {', '.join(found) or 'none'})")
    if federation_classes(cfg) is None:  # every hospital must have the first one's classes
        first = load_hospital_folder(root / expected[0], cfg.data.image_size, None, cfg.data.cache_dir, progress)
        cfg = replace(cfg, data=replace(cfg.data, classes=list(first.classes)))
    parts = [hospital(cfg, i, progress) for i in range(cfg.data.num_clients)]
    offsets = np.cumsum([0] + [len(d) for d, _ in parts])
    paths = [p for d, _ in parts for p in (d.paths or ())]
    data = ImageSet(np.concatenate([d.images for d, _ in parts]), np.concatenate([d.labels for d, _ in parts]),
                    parts[0][0].classes, str(root), tuple(paths) if paths else None)
    splits = [ClientSplit(i, s.train_idx + off, s.test_idx + off, s.val_idx + off)
              for i, ((_, s), off) in enumerate(zip(parts, offsets))]
    return data, splits


def client_loaders(cfg: ExperimentConfig, client: int, round_: int = 0,
                   batch_size: int | None = None) -> tuple[DataLoader, DataLoader, int]:
    """(train, test, number of classes) for one client; train batches are shuffled and augmented."""
    data, split = hospital(cfg, client)
    train = make_loader(data, split.train_idx, batch_size or cfg.train.batch_size, train=True,
                        seed=client_seed(cfg, client, round_), augment=cfg.data.training_augmentation)
    test = make_loader(data, split.test_idx, max(cfg.train.batch_size, 64), train=False)
    return train, test, len(data.classes)


def validation_loader(cfg: ExperimentConfig, client: int) -> DataLoader:
    """The client's clean held-out scans (data.val_fraction), for calibrating the detector."""
    data, split = hospital(cfg, client)
    if split.n_val == 0:
        raise ValueError("calibrating the detector needs clean validation scans: set data.val_fraction > 0")
    return make_loader(data, split.val_idx, 64, train=False)


def num_classes(cfg: ExperimentConfig) -> int:
    """From the config when it names the classes (a deployment's server has no scans)."""
    if cfg.data.classes:
        return len(cfg.data.classes)
    if cfg.data.layout == "hospital":
        return len(hospital(cfg, 0)[0].classes)
    return len(data_and_splits(cfg)[0].classes)


def round_lr(cfg: ExperimentConfig, server_round: int) -> float:
    """The rate a round's optimizer starts from (train.schedule=step: lr * lr_decay^(r-1))."""
    return cfg.train.lr * cfg.train.lr_decay ** max(server_round - 1, 0)


def linear_factor(cfg: ExperimentConfig, server_round: int, step: int, steps: int) -> float:
    """train.schedule=linear: the share of train.lr at local step `step` (from 0) of a round of
    `steps`, the run being train.rounds such rounds in order: up linearly over the first
    train.warmup of them, then down linearly towards 0 at the end (each step at its midpoint, so
    neither the first nor the last is a step of rate 0)."""
    t = ((server_round - 1) * steps + step + 0.5) / (cfg.train.rounds * steps)
    warm = cfg.train.warmup
    return t / warm if t <= warm else max(0.0, (1 - t) / (1 - warm))


def round_schedule(cfg: ExperimentConfig, optimizer: torch.optim.Optimizer, server_round: int,
                   batches: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-step schedule of a round with `batches` batches an epoch (None for train.schedule=step,
    whose rate is fixed within the round)."""
    if cfg.train.schedule == "step":
        return None
    steps = max(1, batches * cfg.train.local_epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_factor(cfg, server_round, s, steps))


def test_local(model: torch.nn.Module, loader: DataLoader, cfg: ExperimentConfig, seed: int,
               with_attack: bool = True) -> dict[str, float]:
    """Clean accuracy on the whole split, and white-box PGD (`attack.*`) on up to
    `attack.max_eval_per_client` of its scans."""
    attack = make_pgd(model, cfg.attack, seed) if with_attack else None
    return evaluate_accuracy(model, loader, attack, cfg.attack.max_eval_per_client, cfg.device)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
