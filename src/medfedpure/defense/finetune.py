"""Phase 4: adversarial fine-tuning of the purifier against a hospital's own classifier.

After phase 3 the classifier (shared experts + the hospital's gate) is frozen and the U-Net
learns instead: per batch, phase 3's training attack (`defense.adv_attack` or `method.adv_attack`, the budget of adversarial
training, or `defense.purifier.adv_attack` / `adv_steps` where set: a multi-step PGD while phase 3
used a single-step attack) is crafted through purification at a depth drawn from [t_min, t_max], exactly as
phase 3 crafts it, and the U-Net descends

    CE(f(purify(x_adv)), y) + clean_weight * CE(f(purify(x)), y) + denoise_weight * L_denoise(x)

with gradients through the purification into the U-Net's weights (the attack itself takes
gradients with respect to the scans only). The denoising term (Eq. 16) keeps it a denoiser,
which the detectors built on it need. This is the purifier-side half of what has held up
against adaptive attacks on diffusion purification (AToP, arXiv 2401.16352; ADBM, arXiv
2408.00315); the server averages the hospitals' U-Nets as in phase 1.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from medfedpure.attacks import make_training_attack
from medfedpure.config import ExperimentConfig
from medfedpure.defense.diffusion import GaussianDiffusion
from medfedpure.defense.pipeline import RandomDepthPurified
from medfedpure.loop import fit


class _Frozen:
    """The classifier's weights out of autograd (and in eval mode) for the block, then as they were."""

    def __init__(self, classifier: nn.Module) -> None:
        self.classifier = classifier

    def __enter__(self) -> nn.Module:
        self.flags = [p.requires_grad for p in self.classifier.parameters()]
        self.was_training = self.classifier.training
        self.classifier.requires_grad_(False).eval()
        return self.classifier

    def __exit__(self, *exc) -> None:
        for p, flag in zip(self.classifier.parameters(), self.flags):
            p.requires_grad_(flag)
        self.classifier.train(self.was_training)


def purifier_loss(target: RandomDepthPurified, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                  cfg: ExperimentConfig) -> tuple[torch.Tensor, dict]:
    """The phase-4 objective on one batch (`x_adv`: the attack on `x` through `target`, the frozen
    classifier behind the purifier being trained), and its parts, summed over the batch."""
    s = cfg.defense.purifier
    adv_logits = target(x_adv)
    loss = F.cross_entropy(adv_logits, y)
    parts = {"adv_loss": float(loss.detach()) * len(y), "adv_correct": int((adv_logits.argmax(1) == y).sum())}
    if s.clean_weight > 0:
        clean_logits = target(x)
        clean = F.cross_entropy(clean_logits, y)
        loss = loss + s.clean_weight * clean
        parts.update(clean_loss=float(clean.detach()) * len(y), clean_correct=int((clean_logits.argmax(1) == y).sum()))
    if s.denoise_weight > 0:
        denoise = target.diffusion.loss(x, generator=target.generator)
        loss = loss + s.denoise_weight * denoise
        parts["denoise_loss"] = float(denoise.detach()) * len(y)
    return loss, parts


def _target(classifier: nn.Module, diffusion: GaussianDiffusion, cfg: ExperimentConfig, seed: int):
    """The classifier behind a random-depth purification, in eval mode (an attack restores the mode
    it found, so the frozen classifier's BatchNorm statistics never move), and the training attack on it."""
    target = RandomDepthPurified(classifier, diffusion, cfg.defense, torch.Generator().manual_seed(seed)).eval()
    method = cfg.defense.purifier.training_method(cfg.defense.training_method(cfg.method))  # phase 3's, or its own
    return target, make_training_attack(target, dataclasses.replace(cfg, method=method), seed=seed)


def finetune_purifier(diffusion: GaussianDiffusion, classifier: nn.Module, loader: DataLoader,
                      cfg: ExperimentConfig, seed: int) -> dict[str, float]:
    """`defense.purifier.local_epochs` of AdamW (no weight decay) on the U-Net; the classifier is left
    as it was. Returns the last epoch's means per scan: loss, its parts, accuracy behind the purifier
    on the attacked (adv_acc) and clean (clean_acc) training scans."""
    s = cfg.defense.purifier
    optimizer = torch.optim.AdamW(diffusion.parameters(), lr=s.lr, weight_decay=0.0)
    with _Frozen(classifier):
        target, attack = _target(classifier, diffusion, cfg, seed)

        def step(batch):
            x, y = (t.to(cfg.device) for t in batch)
            loss, parts = purifier_loss(target, x, attack(x, y), y, cfg)
            return loss, len(y), parts

        last = fit(diffusion, loader, optimizer, s.local_epochs, step)
    return _rates(last)


def evaluate_purifier(diffusion: GaussianDiffusion, classifier: nn.Module, loader: DataLoader,
                      cfg: ExperimentConfig, seed: int = 123) -> dict[str, float]:
    """The phase-4 objective on held-out scans with a fixed seed (comparable across rounds): its
    loss per scan, its parts, and the accuracy behind the purifier on the attacked and clean scans."""
    sums: dict[str, float] = {"loss": 0.0}
    n = 0
    with _Frozen(classifier):
        target, attack = _target(classifier, diffusion, cfg, seed)
        for x, y in loader:
            x, y = x.to(cfg.device), y.to(cfg.device)
            x_adv = attack(x, y)
            with torch.no_grad():
                loss, parts = purifier_loss(target, x, x_adv, y, cfg)
            sums["loss"] += float(loss) * len(y)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            n += len(y)
    return _rates({k: v / max(n, 1) for k, v in sums.items()})


def _rates(sums: dict[str, float]) -> dict[str, float]:
    """'adv_correct' / 'clean_correct' (already per scan) renamed to accuracies."""
    out = {k: float(v) for k, v in sums.items() if not k.endswith("_correct")}
    for kind in ("adv", "clean"):
        if f"{kind}_correct" in sums:
            out[f"{kind}_acc"] = float(sums[f"{kind}_correct"])
    return out
