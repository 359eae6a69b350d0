"""Accuracy on clean and attacked scans, batch-wise."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader


def evaluate_accuracy(model: nn.Module, loader: DataLoader,
                      attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                      max_items: int | None = None, device: str = "cpu") -> dict[str, float]:
    """Clean accuracy and loss on every scan; adversarial accuracy on the first `max_items`."""
    was_training = model.training
    model.eval()
    correct = adv_correct = total = adv_total = 0
    loss_sum = 0.0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                logits = model(x)
                loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
                correct += (logits.argmax(1) == y).sum().item()
            total += len(y)
            if attack is not None and (max_items is None or adv_total < max_items):
                keep = len(y) if max_items is None else min(len(y), max_items - adv_total)
                x_adv = attack(x[:keep], y[:keep])
                with torch.no_grad():
                    adv_correct += (model(x_adv).argmax(1) == y[:keep]).sum().item()
                adv_total += keep
    finally:
        model.train(was_training)
    out = {"clean_acc": correct / max(total, 1), "test_loss": loss_sum / max(total, 1), "n_test": total}
    if attack is not None:
        out.update(adv_acc=adv_correct / max(adv_total, 1), n_adv=adv_total)
    return out
