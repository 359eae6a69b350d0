"""Masked autoencoder with a ViT encoder/decoder (He et al.; docs/design.md, The defense), used as a detector.

Follows the official `models_mae.py` with timm's ViT `Block`. The loss is plain MSE on
raw pixels of the masked patches (no per-patch normalisation: that would hide the
brightness and contrast changes the detector must see). `score(x)` is deterministic:
complementary masks drawn once from a fixed seed make every patch masked in some pass.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from medfedpure.config import MAESettings


def default_patch_size(image_size: int) -> int:
    """4 for 32 px and 16 for 224 px as in the paper; else the largest giving >= 8x8 patches."""
    if image_size == 32:
        return 4
    if image_size == 224:
        return 16
    for p in (16, 8, 4, 2, 1):
        if image_size % p == 0 and image_size // p >= 8:
            return p
    raise ValueError(f"no patch size gives at least 8x8 patches for {image_size} px images")


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, (grid*grid, dim)."""
    if dim % 4:
        raise ValueError("embedding width must be a multiple of 4")
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def embed(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed(yy), embed(xx)], dim=1).float()


class MaskedAutoencoder(nn.Module):
    """The MAE a `defense.mae` section describes, for `image_size`-px scans. `seed` fixes the
    masks `score` uses (the experiment's seed)."""

    def __init__(self, settings: MAESettings, image_size: int, seed: int = 0, in_chans: int = 3,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        p = settings.patch_size or default_patch_size(image_size)
        if image_size % p:
            raise ValueError(f"patch size {p} does not divide image size {image_size}")
        self.settings, self.image_size, self.seed = settings, image_size, seed
        self.patch_size, self.in_chans = p, in_chans
        s, grid = settings, image_size // p
        self.num_patches = grid * grid
        self.patch_embed = nn.Conv2d(in_chans, s.embed_dim, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, s.embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(s.embed_dim, grid).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList([Block(s.embed_dim, s.num_heads, mlp_ratio, qkv_bias=True)
                                     for _ in range(s.depth)])
        self.norm = nn.LayerNorm(s.embed_dim)

        self.decoder_embed = nn.Linear(s.embed_dim, s.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, s.decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(s.decoder_embed_dim, grid).unsqueeze(0),
                             persistent=False)
        self.decoder_blocks = nn.ModuleList([Block(s.decoder_embed_dim, s.decoder_num_heads, mlp_ratio,
                                                   qkv_bias=True) for _ in range(s.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(s.decoder_embed_dim)
        self.decoder_pred = nn.Linear(s.decoder_embed_dim, p * p * in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C)"""
        p, c = self.patch_size, self.in_chans
        b, _, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, c = self.patch_size, self.in_chans
        g = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    # ---- masking
    def random_keep(self, batch: int, device: torch.device, generator: torch.Generator | None = None
                    ) -> torch.Tensor:
        """Indices of the visible patches, (B, L_keep), a fresh random set per image."""
        keep = int(round(self.num_patches * (1 - self.settings.mask_ratio)))
        noise = torch.rand(batch, self.num_patches, device=device, generator=generator)
        return noise.argsort(dim=1)[:, :keep]

    def complementary_keeps(self) -> list[torch.Tensor]:
        """Visible-patch sets from a fixed seed whose masks together cover every patch."""
        gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(self.num_patches, generator=gen)
        keep = max(1, int(round(self.num_patches * (1 - self.settings.mask_ratio))))
        return [perm[i:i + keep] for i in range(0, self.num_patches, keep)]

    # ---- encoder / decoder
    def encode(self, imgs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2) + self.pos_embed
        x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def decode(self, latent: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Predicted pixels of every patch, (B, L, p*p*C)."""
        x = self.decoder_embed(latent)
        b, d = x.shape[0], x.shape[-1]
        full = self.mask_token.expand(b, self.num_patches, d).clone()
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, d), x[:, 1:])
        x = torch.cat([x[:, :1], full + self.decoder_pos_embed], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def _masked(self, keep: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(keep.shape[0], self.num_patches, device=keep.device)
        return mask.scatter(1, keep, 0.0)  # 1 = masked (to reconstruct), 0 = visible

    def forward(self, imgs: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (loss on masked patches, prediction, mask)."""
        keep = self.random_keep(imgs.shape[0], imgs.device, generator)
        pred = self.decode(self.encode(imgs, keep), keep)
        mask = self._masked(keep)
        per_patch = ((pred - self.patchify(imgs)) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum(), pred, mask

    def error_map(self, imgs: torch.Tensor) -> torch.Tensor:
        """Per-patch squared error, each patch averaged over the passes that masked it, (B, L)."""
        target = self.patchify(imgs)
        total = torch.zeros(imgs.shape[0], self.num_patches, device=imgs.device)
        count = torch.zeros(self.num_patches, device=imgs.device)
        for keep in self.complementary_keeps():
            keep_b = keep.to(imgs.device).unsqueeze(0).expand(imgs.shape[0], -1)
            pred = self.decode(self.encode(imgs, keep_b), keep_b)
            mask = self._masked(keep_b)
            total = total + ((pred - target) ** 2).mean(dim=-1) * mask
            count = count + mask[0]
        return total / count.clamp_min(1)

    def score(self, imgs: torch.Tensor) -> torch.Tensor:
        """s_det(x), Eq. 22: mean reconstruction error over all patches; deterministic per image."""
        return self.error_map(imgs).mean(dim=1)
