"""The one training loop: every model here (experts, a baseline's learners, the MAE, the U-Net)
trains through `fit`, nanoGPT-style: for each batch, compute the loss, step, keep the sums."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def fit(model: nn.Module, batches: Iterable[Any], optimizer: torch.optim.Optimizer, epochs: int,
        step: Callable[[Any], tuple[torch.Tensor, int, dict[str, float]]],
        schedule: torch.optim.lr_scheduler.LRScheduler | None = None) -> dict[str, float]:
    """`epochs` passes over `batches`; `step(batch)` returns (mean loss of the batch, its size, other
    figures summed over the batch); `schedule`, if any, steps after every optimizer step. Returns the
    last epoch's means per scan: `loss` (weighted by batch size) and every other figure's sum over
    the epoch divided by its scans."""
    model.train()
    last: dict[str, float] = {}
    for _ in range(epochs):
        sums: dict[str, float] = {"loss": 0.0}
        n = 0
        for batch in batches:
            loss, size, logs = step(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            sums["loss"] += loss.item() * size
            for name, value in logs.items():
                sums[name] = sums.get(name, 0.0) + value
            n += size
        last = {name: total / max(n, 1) for name, total in sums.items()}
    return last


def make_optimizer(groups: list[dict], name: str, lr: float, momentum: float = 0.9,
                   nesterov: bool = False) -> torch.optim.Optimizer:
    """SGD with momentum (Nesterov's with `nesterov`) or Adam over parameter groups that carry their own
    weight decay."""
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


def channels_last(*modules: nn.Module) -> None:
    """Put the modules' convolution weights in channels-last layout (in place), for inference:
    oneDNN's convolutions run faster that way on CPU. The outputs agree with the default layout
    to float rounding; the weights are no longer contiguous, so save the state of a module that
    was never converted."""
    for module in modules:
        module.to(memory_format=torch.channels_last)
