"""Local training of the paper's baselines (docs/design.md, Baselines), one round on one client.

- FedAvg / Local: cross-entropy on a plain classifier (a `LearnerMixture` with K=1).
- FAT / Local Adv: the same, with a share of every batch replaced by PGD examples made on
  the client's current model (Madry-style adversarial training, true cross-entropy PGD; or one
  N-FGSM / FGSM-RS step with method.adv_attack).
- FedEM: E-step q_i(m) = softmax_m(log pi_m - loss_m(x_i, y_i)), pi = mean_i q_i, then the
  M-step trains every learner on its q-weighted loss.
- pFedDef: FedEM where, every Q rounds, a share G of the client's training scans is replaced
  by PGD examples made on its own current model; they stay until the next regeneration.
  With resource caps R_i, client i replaces h_i <= R_i instead (`adversarial_shares`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medfedpure.attacks import PGD, make_training_attack
from medfedpure.config import ExperimentConfig
from medfedpure.data import ImageSet
from medfedpure.data.loaders import ImageTensorDataset, drops_lone_sample
from medfedpure.loop import fit, make_optimizer
from medfedpure.methods.task import round_schedule
from medfedpure.models.mixture import LearnerMixture

log = logging.getLogger(__name__)


@dataclass
class AdversarialSet:
    """pFedDef's replaced training scans: positions in the client's training split and their PGD versions."""

    index: torch.Tensor  # int64 (M,), positions within the client's training split
    images: torch.Tensor  # float (M, 3, S, S) in [0, 1]
    round: int  # the round that made them

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"index": self.index, "images": self.images}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], rnd: int) -> "AdversarialSet":
        return cls(tensors["index"].long(), tensors["images"].float(), rnd)


class ClientTrainingSet(ImageTensorDataset):
    """A client's training scans with their positions (FedEM weighs each sample by its own q),
    some of them replaced by adversarial versions (pFedDef)."""

    def __init__(self, data: ImageSet, indices: np.ndarray, augment: str | None,
                 replaced: AdversarialSet | None = None) -> None:
        super().__init__(data, indices, augment)
        self.replacement = {} if replaced is None else {int(i): k for k, i in enumerate(replaced.index)}
        self.replaced = replaced

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        k = self.replacement.get(i)
        x = self.images[i].float().div_(255.0) if k is None else self.replaced.images[k].clone()
        if self.transform is not None:
            x = self.transform(x).clamp_(0.0, 1.0)
        return x, self.labels[i], i


def adversarial_batch(attack: PGD, x: torch.Tensor, y: torch.Tensor, share: float) -> tuple[torch.Tensor, int]:
    """The batch with its first ceil(share * B) scans (the loader shuffles) replaced by PGD examples."""
    k = min(len(x), math.ceil(share * len(x))) if share > 0 else 0
    if k == 0:
        return x, 0
    return torch.cat([attack(x[:k], y[:k]), x[k:]]), k


def _optimizer(model: LearnerMixture, cfg: ExperimentConfig, lr: float) -> torch.optim.Optimizer:
    return make_optimizer([{"params": model.experts.parameters(), "weight_decay": cfg.train.weight_decay}],
                          cfg.train.optimizer, lr, cfg.train.momentum, cfg.train.nesterov)


def _loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """Shuffled (training) loaders drop a last batch of one scan, as `make_loader` does."""
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed),
                      drop_last=shuffle and drops_lone_sample(len(ds), batch_size), num_workers=0)


def train_plain(model: LearnerMixture, data: ImageSet, indices: np.ndarray, cfg: ExperimentConfig,
                lr: float, seed: int, adv_share: float = 0.0, server_round: int = 1) -> dict[str, float]:
    """FedAvg / Local (adv_share 0) and FAT / Local Adv (adv_share > 0) local epochs from rate `lr`
    (with train.schedule=linear, stepped through round `server_round`'s share of the run)."""
    loader = _loader(ClientTrainingSet(data, indices, cfg.data.training_augmentation), cfg.train.batch_size, True, seed)
    attack = make_training_attack(model, cfg, seed) if adv_share > 0 else None

    def step(batch):
        x, y, _ = batch
        x, y = x.to(cfg.device), y.to(cfg.device)
        k = 0
        if attack is not None:
            x, k = adversarial_batch(attack, x, y, adv_share)
        return model.loss(x, y, label_smoothing=cfg.train.label_smoothing)[0], len(y), {"adv_share": k}

    optimizer = _optimizer(model, cfg, lr)
    last = fit(model, loader, optimizer, cfg.train.local_epochs, step,
               round_schedule(cfg, optimizer, server_round, len(loader)))
    return {"train_loss": last["loss"], "gate_entropy": 0.0, "adv_share": last.get("adv_share", 0.0)}


def adversarial_shares(target: float, sizes: Sequence[int], caps: float | Sequence[float] | None) -> list[float]:
    """pFedDef's resource-aware split of the robustness budget: shares h_i <= R_i whose
    n_i-weighted mean is G, as equal as the caps allow.

    Greedy water-filling: clients in order of rising cap take their cap while it is below the
    level the rest would need, the others share the remainder equally. Clients with spare
    resources so cover for those without, which is the point of pFedDef's solver; where the
    caps cannot reach G at all, every client runs at its cap and the shortfall is logged.
    """
    sizes = [int(n) for n in sizes]
    if caps is None:
        return [float(target)] * len(sizes)
    caps = [float(caps)] * len(sizes) if isinstance(caps, (int, float)) else [float(c) for c in caps]
    if len(caps) != len(sizes):
        raise ValueError(f"method.adv_resources has {len(caps)} caps for {len(sizes)} clients")
    total = sum(sizes)
    need, rest = target * total, total
    shares = [0.0] * len(sizes)
    order = sorted(range(len(sizes)), key=lambda i: caps[i])
    for pos, i in enumerate(order):
        level = need / rest if rest else 0.0
        if caps[i] < level:
            shares[i] = caps[i]
            need -= caps[i] * sizes[i]
            rest -= sizes[i]
            continue
        for j in order[pos:]:
            shares[j] = level
        break
    reached = sum(h * n for h, n in zip(shares, sizes)) / max(total, 1)
    if reached < target - 1e-9:
        log.warning("pFedDef resource caps allow an adversarial share of %.3f, below G = %.3f", reached, target)
    return shares


def make_adversarial_set(model: LearnerMixture, data: ImageSet, indices: np.ndarray, cfg: ExperimentConfig,
                         seed: int, rnd: int, share: float | None = None) -> AdversarialSet:
    """pFedDef: PGD versions of a random share (G, or this client's solved h_i) of its training
    scans, made on its current model."""
    n = len(indices)
    share = cfg.method.adv_data_share if share is None else share
    m = min(n, math.ceil(share * n))
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=gen)[:m].sort().values
    attack = make_training_attack(model, cfg, seed)
    clean = ClientTrainingSet(data, np.asarray(indices)[chosen.numpy()], augment=None)
    parts = []
    for x, y, _ in _loader(clean, 64, False, seed):
        parts.append(attack(x.to(cfg.device), y.to(cfg.device)).cpu())
    images = torch.cat(parts) if parts else torch.empty((0, 3, data.images.shape[2], data.images.shape[3]))
    return AdversarialSet(chosen.long(), images, rnd)


@torch.no_grad()
def e_step(model: LearnerMixture, dataset: ClientTrainingSet, cfg: ExperimentConfig) -> torch.Tensor:
    """q (N, K): responsibilities of the learners for each training sample; also sets pi = mean q."""
    was_training = model.training
    model.eval()
    losses = torch.empty((len(dataset), model.num_learners))
    for x, y, i in _loader(dataset, 128, False, 0):
        losses[i] = model.learner_losses(x.to(cfg.device), y.to(cfg.device)).cpu()
    q = torch.softmax(model.log_pi.cpu().view(1, -1) - losses, dim=1)
    model.log_pi.copy_(q.mean(dim=0).clamp_min(1e-12).log().to(model.log_pi.device))
    model.train(was_training)
    return q


def train_fedem(model: LearnerMixture, data: ImageSet, indices: np.ndarray, cfg: ExperimentConfig,
                lr: float, seed: int, adversarial: AdversarialSet | None = None, server_round: int = 1
                ) -> dict[str, float]:
    """One FedEM round: E-step on the (possibly partly adversarial) training set, then the M-step
    (its rate as in `train_plain`)."""
    q = e_step(model, ClientTrainingSet(data, indices, None, adversarial), cfg).to(cfg.device)
    loader = _loader(ClientTrainingSet(data, indices, cfg.data.training_augmentation, adversarial), cfg.train.batch_size, True, seed)
    pi = model.log_pi.exp()
    entropy = float(-(pi * model.log_pi).sum())

    def step(batch):
        x, y, i = batch
        x, y = x.to(cfg.device), y.to(cfg.device)
        return model.loss(x, y, weights=q[i], label_smoothing=cfg.train.label_smoothing)[0], len(y), {}

    optimizer = _optimizer(model, cfg, lr)
    last = fit(model, loader, optimizer, cfg.train.local_epochs, step,
               round_schedule(cfg, optimizer, server_round, len(loader)))
    share = 0.0 if adversarial is None else len(adversarial.index) / max(len(indices), 1)
    return {"train_loss": last["loss"], "gate_entropy": entropy, "adv_share": share}
