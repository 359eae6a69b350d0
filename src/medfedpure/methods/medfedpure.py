"""MedFedPure's local round: the personalized MoE on the mixture loss (Eq. 9), optionally with
the purifier in the loop (Algorithm 3's optional step, and adversarial training through it).

With a purifier (a GaussianDiffusion), half of each batch is replaced by its purified
version, so the experts know both clean and purified scans. With `defense.adv_share` > 0 as
well, that share of each batch is first replaced by an attack crafted on the model behind the
purifier (a fresh depth and noise at every gradient; PGD-k, or one N-FGSM / FGSM-RS step with
`defense.adv_attack`, else `method.adv_attack`), then purified.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.utils.data import DataLoader

from medfedpure.attacks import PGD, make_training_attack
from medfedpure.config import ExperimentConfig
from medfedpure.defense.pipeline import RandomDepthPurified
from medfedpure.loop import fit, make_optimizer
from medfedpure.methods.task import round_lr, round_schedule
from medfedpure.models import PersonalizedMoE


def purify_batch(diffusion, x: torch.Tensor, cfg: ExperimentConfig, gen: torch.Generator) -> torch.Tensor:
    """Scans purified at a depth drawn from [t_min, t_max]."""
    with torch.no_grad():
        return RandomDepthPurified(None, diffusion, cfg.defense, gen).purify(x)


def defended_training_batch(x: torch.Tensor, y: torch.Tensor, purifier, attack: PGD | None, share: float,
                            cfg: ExperimentConfig, gen: torch.Generator, raw_attack: PGD | None = None,
                            raw_share: float = 0.0) -> torch.Tensor:
    """What the experts see of a batch when they train for the defense: the first `share` of it
    attacked through the purifier (if `attack`), the next `raw_share` attacked on the classifier
    alone (if `raw_attack`) and left raw; the attacked-through-the-purifier scans and half the rest
    purified, the other half clean."""
    k = min(len(x), math.ceil(share * len(x))) if attack is not None else 0
    r = min(len(x) - k, math.ceil(raw_share * len(x))) if raw_attack is not None else 0
    attacked = attack(x[:k], y[:k]) if k else x[:0]
    raw = raw_attack(x[k:k + r], y[k:k + r]) if r else x[:0]
    rest = k + r
    half = (len(x) - rest) // 2
    purified = purify_batch(purifier, torch.cat([attacked, x[rest:rest + half]]), cfg, gen)
    return torch.cat([purified[:k], raw, purified[k:], x[rest + half:]])


def moe_optimizer(model: PersonalizedMoE, cfg: ExperimentConfig, lr: float) -> torch.optim.Optimizer:
    # The gate has its own L2 term (beta) in the loss, so no weight decay on it.
    return make_optimizer([{"params": model.experts.parameters(), "weight_decay": cfg.train.weight_decay},
                           {"params": model.attention.parameters(), "weight_decay": 0.0}],
                          cfg.train.optimizer, lr, cfg.train.momentum, cfg.train.nesterov)


def train_local(model: PersonalizedMoE, loader: DataLoader, cfg: ExperimentConfig,
                server_round: int = 1, purifier=None) -> dict[str, float]:
    """E local epochs on the mixture loss (Eq. 9); returns the last epoch's mean loss and gate entropy."""
    optimizer = moe_optimizer(model, cfg, round_lr(cfg, server_round))
    gen = torch.Generator().manual_seed(cfg.seed + server_round)
    attack = raw_attack = None
    cfg_attack = dataclasses.replace(cfg, method=cfg.defense.training_method(cfg.method))  # defense.adv_attack
    if purifier is not None and cfg.defense.adv_share > 0:
        target = RandomDepthPurified(model, purifier, cfg.defense, gen)
        attack = make_training_attack(target, cfg_attack, seed=cfg.seed * 1_000 + server_round)
    if purifier is not None and cfg.defense.adv_raw_share > 0:
        raw_attack = make_training_attack(model, cfg_attack, seed=cfg.seed * 1_000 + 500 + server_round)

    def step(batch):
        x, y = (t.to(cfg.device) for t in batch)
        if purifier is not None:
            x = defended_training_batch(x, y, purifier, attack, cfg.defense.adv_share, cfg, gen, raw_attack,
                                        cfg.defense.adv_raw_share)
        loss, parts = model.loss(x, y, cfg.train.label_smoothing)
        return loss, len(y), {"gate_entropy": parts["gate_entropy"] * len(y)}

    last = fit(model, loader, optimizer, cfg.train.local_epochs, step,
               round_schedule(cfg, optimizer, server_round, len(loader)))
    return {"train_loss": last["loss"], "gate_entropy": last.get("gate_entropy", 0.0),
            "adv_share": (cfg.defense.adv_share if attack is not None else 0.0)
            + (cfg.defense.adv_raw_share if raw_attack is not None else 0.0)}
