"""What a hospital has and does whatever the method (Flower's task.py): its scans and their
split, its seeds, the round's learning rate, and the test of a model on its test split."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch
from torch.utils.data import DataLoader

from medfedpure.attacks import make_pgd
from medfedpure.config import ExperimentConfig
from medfedpure.data import ClientSplit, ImageSet, load_dataset, make_client_splits, make_loader
from medfedpure.metrics import evaluate_accuracy


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def client_seed(cfg: ExperimentConfig, client: int, round_: int = 0) -> int:
    return cfg.seed * 1_000_003 + client * 10_007 + round_


_CACHE: dict[tuple[str, int], tuple[ImageSet, list[ClientSplit]]] = {}


def data_and_splits(cfg: ExperimentConfig, progress: bool = False) -> tuple[ImageSet, list[ClientSplit]]:
    """The dataset and every client's split; kept per process for the last two datasets (a Ray
    actor serves many clients). `progress`: a bar while images are decoded the first time."""
    key = (ExperimentConfig(data=cfg.data).to_json(), cfg.seed)
    if key not in _CACHE:
        data = load_dataset(cfg.data, seed=cfg.seed, progress=progress)
        splits = make_client_splits(data.labels, cfg.data.num_clients, cfg.data.partition,
                                    cfg.data.dirichlet_alpha, cfg.data.test_fraction, cfg.seed,
                                    cfg.data.min_client_size, cfg.data.val_fraction)
        while len(_CACHE) >= 2:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = (data, splits)
    return _CACHE[key]


def client_loaders(cfg: ExperimentConfig, client: int, round_: int = 0,
                   batch_size: int | None = None) -> tuple[DataLoader, DataLoader, int]:
    """(train, test, number of classes) for one client; train batches are shuffled and augmented."""
    data, splits = data_and_splits(cfg)
    split = splits[client]
    train = make_loader(data, split.train_idx, batch_size or cfg.train.batch_size, train=True,
                        seed=client_seed(cfg, client, round_), augment=cfg.data.augment)
    test = make_loader(data, split.test_idx, max(cfg.train.batch_size, 64), train=False)
    return train, test, len(data.classes)


def validation_loader(cfg: ExperimentConfig, client: int) -> DataLoader:
    """The client's clean held-out scans (data.val_fraction), for calibrating the detector."""
    data, splits = data_and_splits(cfg)
    if splits[client].n_val == 0:
        raise ValueError("calibrating the detector needs clean validation scans: set data.val_fraction > 0")
    return make_loader(data, splits[client].val_idx, 64, train=False)


def num_classes(cfg: ExperimentConfig) -> int:
    return len(data_and_splits(cfg)[0].classes)


def round_lr(cfg: ExperimentConfig, server_round: int) -> float:
    return cfg.train.lr * cfg.train.lr_decay ** max(server_round - 1, 0)


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
