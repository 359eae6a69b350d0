"""Epsilon-prediction U-Net (docs/design.md, The defense): DoubleConv blocks, 4 down and 4 up with skips,
sinusoidal time embedding -> Linear -> SiLU -> MLP (paper Eq. 11-12)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medfedpure.config import DiffusionSettings


def sincos_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Eq. 12: sin/cos of t / 10000^(2i/d), (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float().unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([args.sin(), args.cos()], dim=1)


class TimeEmbedding(nn.Module):
    """Eq. 11: MLP(SiLU(Linear(SinCos(t))))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(dim, 4 * dim)
        self.mlp = nn.Sequential(nn.Linear(4 * dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, 4 * dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(F.silu(self.linear(sincos_embedding(t, self.dim))))


def _groups(ch: int) -> int:
    return next(g for g in (8, 4, 2, 1) if ch % g == 0)


class DoubleConv(nn.Module):
    """(conv3x3 -> GroupNorm -> SiLU) twice, with the time embedding added in between."""

    def __init__(self, cin: int, cout: int, temb: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm1 = nn.GroupNorm(_groups(cout), cout)
        self.time = nn.Linear(temb, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        h = h + self.time(temb)[:, :, None, None]
        return F.silu(self.norm2(self.conv2(h)))


class UNet(nn.Module):
    """The network a `defense.diffusion` section describes (hidden width, levels, time_dim)."""

    def __init__(self, settings: DiffusionSettings, in_chans: int = 3) -> None:
        super().__init__()
        self.levels = settings.levels
        c, temb = settings.hidden, 4 * settings.time_dim
        self.time_embed = TimeEmbedding(settings.time_dim)
        self.inc = DoubleConv(in_chans, c, temb)
        self.downs = nn.ModuleList([DoubleConv(c, c, temb) for _ in range(settings.levels)])
        self.ups = nn.ModuleList([DoubleConv(2 * c, c, temb) for _ in range(settings.levels)])
        self.out = nn.Conv2d(c, in_chans, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        if size % (2 ** self.levels):
            raise ValueError(f"image size {size} must be divisible by 2^{self.levels} for this U-Net")
        temb = self.time_embed(t)
        h = self.inc(x, temb)
        skips = []
        for down in self.downs:
            skips.append(h)
            h = down(F.max_pool2d(h, 2), temb)
        for up in self.ups:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = up(torch.cat([h, skips.pop()], dim=1), temb)
        return self.out(h)
