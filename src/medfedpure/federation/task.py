"""What a client does locally: load its split, build the model, train, test (Flower's task.py)."""

from __future__ import annotations

import functools
import hashlib
import math
import random

import numpy as np
import torch
from torch.utils.data import DataLoader

from medfedpure.attacks import PGD
from medfedpure.config import ExperimentConfig
from medfedpure.data import ClientSplit, ImageSet, load_dataset, make_client_splits, make_loader
from medfedpure.defense.pipeline import RandomDepthPurified
from medfedpure.evaluation import evaluate_accuracy
from medfedpure.methods import build_classifier
from medfedpure.models import LearnerMixture, PersonalizedMoE


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def client_seed(cfg: ExperimentConfig, client: int, round_: int = 0) -> int:
    return cfg.seed * 1_000_003 + client * 10_007 + round_


@functools.lru_cache(maxsize=2)
def _data_and_splits(data_json: str, seed: int) -> tuple[ImageSet, list[ClientSplit]]:
    cfg = ExperimentConfig.from_json(data_json)
    data = load_dataset(cfg.data, seed=seed)
    splits = make_client_splits(data.labels, cfg.data.num_clients, cfg.data.partition,
                                cfg.data.dirichlet_alpha, cfg.data.test_fraction, seed,
                                cfg.data.min_client_size, cfg.data.val_fraction)
    return data, splits


def data_and_splits(cfg: ExperimentConfig) -> tuple[ImageSet, list[ClientSplit]]:
    """The dataset and every client's split; cached per process (a Ray actor serves many clients)."""
    only_data = ExperimentConfig(data=cfg.data)
    return _data_and_splits(only_data.to_json(), cfg.seed)


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


def new_model(cfg: ExperimentConfig, n_classes: int, init_seed: int) -> PersonalizedMoE | LearnerMixture:
    """The classifier of the config's method (MedFedPure's MoE, or a baseline's learner mixture)."""
    torch.manual_seed(init_seed)
    return build_classifier(cfg, n_classes).to(cfg.device)


def round_lr(cfg: ExperimentConfig, server_round: int) -> float:
    return cfg.train.lr * cfg.train.lr_decay ** max(server_round - 1, 0)


def make_optimizer(model: PersonalizedMoE, cfg: ExperimentConfig, lr: float) -> torch.optim.Optimizer:
    # The gate has its own L2 term (beta) in the loss, so no weight decay on it.
    groups = [{"params": model.experts.parameters(), "weight_decay": cfg.train.weight_decay},
              {"params": model.attention.parameters(), "weight_decay": 0.0}]
    if cfg.train.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.train.momentum)


def purify_batch(diffusion, x: torch.Tensor, cfg: ExperimentConfig, gen: torch.Generator) -> torch.Tensor:
    """Algorithm 3's optional step: scans purified at a depth drawn from [t_min, t_max]."""
    d = cfg.defense
    with torch.no_grad():
        return RandomDepthPurified(None, diffusion, d.t_min, d.t_max, d.sampler, d.sampler_steps, gen).purify(x)


def defended_training_batch(x: torch.Tensor, y: torch.Tensor, purifier, attack: PGD | None, share: float,
                            cfg: ExperimentConfig, gen: torch.Generator) -> torch.Tensor:
    """What the experts see of a batch when they train for the defense: the first `share` of it
    attacked through the purifier (if `attack`), those and half the rest purified, the other half clean."""
    k = min(len(x), math.ceil(share * len(x))) if attack is not None else 0
    attacked = attack(x[:k], y[:k]) if k else x[:0]
    half = (len(x) - k) // 2
    purified = purify_batch(purifier, torch.cat([attacked, x[k:k + half]]), cfg, gen)
    return torch.cat([purified, x[k + half:]])


def train_local(model: PersonalizedMoE, loader: DataLoader, cfg: ExperimentConfig,
                server_round: int = 1, purifier=None) -> dict[str, float]:
    """E local epochs on the mixture loss (Eq. 9); returns the mean loss of the last epoch.

    With a `purifier` (a GaussianDiffusion), half of each batch is replaced by its purified
    version, so the experts know both clean and purified scans. With `defense.adv_share` > 0 as
    well, that share of each batch is first replaced by PGD crafted on the model behind the
    purifier (a fresh depth and noise at every step), then purified: adversarial training with
    the purifier in the loop.
    """
    optimizer = make_optimizer(model, cfg, round_lr(cfg, server_round))
    gen = torch.Generator().manual_seed(cfg.seed + server_round)
    attack = None
    if purifier is not None and cfg.defense.adv_share > 0:
        d, a = cfg.defense, cfg.adversarial_training_attack()
        target = RandomDepthPurified(model, purifier, d.t_min, d.t_max, d.sampler, d.sampler_steps, gen)
        attack = PGD(target, eps=a.eps, alpha=a.alpha, steps=a.steps, norm=a.norm, random_start=a.random_start,
                     seed=cfg.seed * 1_000 + server_round)
    model.train()
    stats: dict[str, float] = {}
    for _ in range(cfg.train.local_epochs):
        total = n = 0.0
        entropy = 0.0
        for x, y in loader:
            x, y = x.to(cfg.device), y.to(cfg.device)
            if purifier is not None:
                x = defended_training_batch(x, y, purifier, attack, cfg.defense.adv_share, cfg, gen)
            loss, parts = model.loss(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            entropy += parts["gate_entropy"] * len(y)
            n += len(y)
        stats = {"train_loss": total / max(n, 1), "gate_entropy": entropy / max(n, 1),
                 "adv_share": cfg.defense.adv_share if attack is not None else 0.0}
    return stats


def make_attack(model: torch.nn.Module, cfg: ExperimentConfig, seed: int) -> PGD:
    a = cfg.attack
    return PGD(model, eps=a.eps, alpha=a.alpha, steps=a.steps, norm=a.norm,
               random_start=a.random_start, seed=seed)


def test_local(model: PersonalizedMoE, loader: DataLoader, cfg: ExperimentConfig, seed: int,
               with_attack: bool = True) -> dict[str, float]:
    attack = make_attack(model, cfg, seed) if with_attack else None
    return evaluate_accuracy(model, loader, attack, cfg.attack.max_eval_per_client, cfg.device)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
