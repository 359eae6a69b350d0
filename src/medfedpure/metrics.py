"""Measures: accuracy on clean and attacked scans (batch-wise), AUROC, exact binomial intervals."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy.stats import beta
from torch import nn
from torch.utils.data import DataLoader


def attacked_positions(n: int, cap: int | None) -> np.ndarray | None:
    """Which of a split's n scans a capped attack runs on (None: all of them).

    Evenly spaced over the split, not its first `cap`: splits are kept in class order, so the
    first scans would be the first classes only, and accuracy on them says little about the rest.
    """
    if cap is None or cap >= n:
        return None
    return np.linspace(0, n - 1, cap).round().astype(np.int64)


def attacked_index(offset: int, batch_len: int, positions: np.ndarray | None) -> torch.Tensor | slice:
    """Which scans of a batch that starts at `offset` in its split the attack runs on."""
    if positions is None:
        return slice(None)
    return torch.as_tensor(positions[(positions >= offset) & (positions < offset + batch_len)] - offset)


def evaluate_accuracy(model: nn.Module, loader: DataLoader,
                      attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                      max_items: int | None = None, device: str = "cpu") -> dict[str, float]:
    """Clean accuracy and loss on every scan; adversarial accuracy on `max_items` of them, evenly
    spaced over the split (`attacked_positions`), and clean accuracy on those same scans."""
    was_training = model.training
    model.eval()
    correct = adv_correct = adv_clean_correct = total = adv_total = 0
    loss_sum = 0.0
    positions = attacked_positions(len(loader.dataset), max_items) if attack is not None else None
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                logits = model(x)
                loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
                correct += (logits.argmax(1) == y).sum().item()
            if attack is not None:
                idx = attacked_index(total, len(y), positions)
                xa, ya = x[idx], y[idx]
                if len(ya):
                    adv_clean_correct += (logits[idx].argmax(1) == ya).sum().item()
                    x_adv = attack(xa, ya)
                    with torch.no_grad():
                        adv_correct += (model(x_adv).argmax(1) == ya).sum().item()
                    adv_total += len(ya)
            total += len(y)
    finally:
        model.train(was_training)
    # a figure over no scans is None (n/a), never 0%
    out = {"clean_acc": correct / total if total else None, "test_loss": loss_sum / total if total else None,
           "n_test": total}
    if attack is not None:
        out.update(adv_acc=adv_correct / adv_total if adv_total else None, n_adv=adv_total,
                   clean_acc_attacked=adv_clean_correct / adv_total if adv_total else None)
    return out


@torch.no_grad()
def batched_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> float:
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return correct / max(len(y), 1)


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    neg, pos = np.asarray(negatives, dtype=np.float64), np.asarray(positives, dtype=np.float64)
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial interval for k successes in n trials."""
    if n <= 0:
        raise ValueError("a rate needs at least one trial")
    tail = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - tail, k + 1, n - k))
    return lo, hi
