"""Training loops for the defense models on clean scans (phases 1-2), and their builders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from medfedpure.config import ExperimentConfig, PretrainConfig
from medfedpure.defense.diffusion import GaussianDiffusion
from medfedpure.defense.mae import MaskedAutoencoder
from medfedpure.defense.unet import UNet
from medfedpure.loop import fit
from medfedpure.storage import load_tensors


def build_mae(cfg: ExperimentConfig) -> MaskedAutoencoder:
    return MaskedAutoencoder(cfg.defense.mae, cfg.data.image_size, seed=cfg.seed)


def build_diffusion(cfg: ExperimentConfig) -> GaussianDiffusion:
    return GaussianDiffusion(UNet(cfg.defense.diffusion), cfg.defense.diffusion)


def _mae_loss(model: MaskedAutoencoder, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    return model(x, generator=gen)[0]


def _diffusion_loss(model: GaussianDiffusion, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    return model.loss(x, generator=gen)


@dataclass(frozen=True)
class Phase:
    """A defense model trained on clean scans: how to build it and what loss it descends."""

    name: str
    build: Callable[[ExperimentConfig], nn.Module]
    loss: Callable[[nn.Module, torch.Tensor, torch.Generator | None], torch.Tensor]

    def settings(self, cfg: ExperimentConfig) -> PretrainConfig:
        return getattr(cfg.defense, self.name).train


PHASES = {"mae": Phase("mae", build_mae, _mae_loss), "diffusion": Phase("diffusion", build_diffusion, _diffusion_loss)}


def train_epochs(phase: Phase, model: nn.Module, loader: DataLoader, epochs: int, lr: float,
                 device: str = "cpu", seed: int = 0) -> float:
    """AdamW (no weight decay) on the phase's loss; returns the mean loss of the last epoch."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(seed)

    def step(batch):
        x = batch[0].to(device)
        return phase.loss(model, x, gen), len(x), {}

    return fit(model, loader, opt, epochs, step).get("loss", 0.0)


@torch.no_grad()
def eval_loss(phase: Phase, model: nn.Module, loader: DataLoader, device: str = "cpu", seed: int = 123) -> float:
    """Held-out loss with fixed masks / noise, comparable across rounds."""
    gen = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    total = n = 0
    for x, _ in loader:
        x = x.to(device)
        total += phase.loss(model, x, gen).item() * len(x)
        n += len(x)
    return total / max(n, 1)


def load_pretrained(name: str, cfg: ExperimentConfig, path: str | Path) -> nn.Module:
    """A trained MAE or diffusion model from its safetensors checkpoint, in eval mode."""
    return build_pretrained(name, cfg, load_tensors(path), f"checkpoint '{path}'")


def build_pretrained(name: str, cfg: ExperimentConfig, state: dict, source: str) -> nn.Module:
    """A trained MAE or diffusion model from its weights (`source` names where they came from)."""
    model = PHASES[name].build(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{source} does not match the configured {name} model "
                         f"(was it trained with another preset?): {str(err).splitlines()[0]}") from err
    return model.to(cfg.device).eval()
