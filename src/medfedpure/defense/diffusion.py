"""DDPM forward/reverse process around an epsilon-prediction network (docs/design.md, The defense; paper Eq. 13-17).

Images live in [0,1] outside and in [-1,1] inside. `purify(x, t_star)` noises each scan to
its own depth t* in closed form and runs the reverse process back to t=0, with either the
paper's full ancestral DDPM sampler or a few-step deterministic DDIM sampler for CPUs.
Every operation is differentiable, so an adaptive attack can backpropagate through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medfedpure.config import DiffusionSettings


def gaussian_noise(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Gaussian noise drawn on the generator's own device, then moved: the same draws on CPU and GPU."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, device=where, generator=generator).to(device)


class GaussianDiffusion(nn.Module):
    """The diffusion process a `defense.diffusion` section describes (timesteps, linear beta
    schedule, training depth) around an epsilon-prediction network such as `UNet`."""

    def __init__(self, model: nn.Module, settings: DiffusionSettings) -> None:
        super().__init__()
        self.model = model
        self.timesteps = settings.timesteps
        self.train_t_max = min(settings.train_t_max or self.timesteps, self.timesteps)
        betas = torch.linspace(settings.beta_start, settings.beta_end, self.timesteps, dtype=torch.float64)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        # index i holds the schedule at timestep t = i + 1; t = 0 is the clean image
        for name, value in {"betas": betas, "alphas": alphas, "alphas_cumprod": abar}.items():
            self.register_buffer(name, value.float(), persistent=False)

    # ---- schedule helpers (t is an integer tensor in 1..T; 0 means "clean")
    def abar(self, t: torch.Tensor) -> torch.Tensor:
        ones = torch.ones_like(t, dtype=torch.float32)
        return torch.where(t > 0, self.alphas_cumprod[(t - 1).clamp_min(0)], ones)

    @staticmethod
    def _b(v: torch.Tensor) -> torch.Tensor:
        return v.view(-1, 1, 1, 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Eq. 17: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (x in [-1,1])."""
        a = self._b(self.abar(t))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def loss(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Eq. 16 on [0,1] images, t ~ U{1..train_t_max}."""
        x0 = images * 2 - 1
        where = generator.device if generator is not None else x0.device
        t = torch.randint(1, self.train_t_max + 1, (x0.shape[0],), device=where, generator=generator).to(x0.device)
        noise = gaussian_noise(x0.shape, generator, x0.device)
        return F.mse_loss(self.model(self.q_sample(x0, t, noise), t), noise)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.model(x_t, t)
        a = self._b(self.abar(t))
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        return x0.clamp(-1, 1), eps

    # ---- samplers
    def ddpm_reverse(self, x_t: torch.Tensor, t_start: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral DDPM (Eq. 14-15) from each sample's own t_start down to 0."""
        x = x_t
        for step in range(int(t_start.max()), 0, -1):
            active = t_start >= step
            if not bool(active.any()):
                continue
            t = torch.full_like(t_start, step)
            eps = self.model(x, t)
            beta, alpha, abar = (self._b(v[step - 1].expand(x.shape[0])) for v in
                                 (self.betas, self.alphas, self.alphas_cumprod))
            mean = (x - beta / (1 - abar).sqrt() * eps) / alpha.sqrt()
            if step > 1:
                abar_prev = self.alphas_cumprod[step - 2]
                var = beta * (1 - abar_prev) / (1 - abar)  # posterior variance
                noise = gaussian_noise(x.shape, generator, x.device)
                mean = mean + var.sqrt() * noise
            x = torch.where(self._b(active), mean, x)
        return x

    def ddim_reverse(self, x_t: torch.Tensor, t_start: torch.Tensor, steps: int) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) in `steps` jumps from each sample's t_start to 0."""
        x = x_t
        fractions = torch.linspace(1.0, 0.0, steps + 1, device=x.device)
        for i in range(steps):
            t_now = torch.round(t_start.float() * fractions[i]).long()
            t_next = torch.round(t_start.float() * fractions[i + 1]).long()
            active = t_now > t_next
            x0, eps = self.predict_x0(x, t_now.clamp_min(1))
            a_next = self._b(self.abar(t_next))
            stepped = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
            x = torch.where(self._b(active), stepped, x)
        return x

    def purify(self, images: torch.Tensor, t_star: torch.Tensor, sampler: str = "ddim", steps: int = 1,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Noise [0,1] images to t* (per image; 0 leaves an image untouched) and denoise back; `noise`
        (standard normal, the images' shape) instead of a fresh draw for the forward noising."""
        t_star = t_star.to(images.device).long().clamp(0, self.timesteps)
        x0 = images * 2 - 1
        noise = gaussian_noise(x0.shape, generator, x0.device) if noise is None else noise
        x_t = self.q_sample(x0, t_star, noise)
        if sampler == "ddpm":
            out = self.ddpm_reverse(x_t, t_star, generator)
        elif sampler == "ddim":
            out = self.ddim_reverse(x_t, t_star, steps)
        else:
            raise ValueError(f"unknown sampler '{sampler}' (ddpm or ddim)")
        out = ((out.clamp(-1, 1) + 1) / 2)
        return torch.where(self._b(t_star > 0), out, images)
