"""Detection scores behind one interface: `detector(images) -> score per scan` (higher = more suspect).

- `MAEDetector`: the paper's mean MAE reconstruction error (Eq. 22).
- `ResidualDetector`: how badly the diffusion model predicts the noise it was given at a
  small t; adversarial high-frequency patterns are off the model's clean manifold.
- `DisagreementDetector`: KL between the classifier's prediction on a scan and on its
  one-step purification; PGD perturbations are brittle under denoising (docs/design.md, Why three detectors).
Each registers in `DETECTORS` under its `name`; `build_detector` makes one from the defense's parts.
All are deterministic for a given scan (fixed noise seeds) and differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medfedpure.config import DETECTOR_NAMES
from medfedpure.defense.diffusion import GaussianDiffusion
from medfedpure.defense.mae import MaskedAutoencoder


def _fixed_noise(shape: torch.Size, seed: int, device: torch.device) -> torch.Tensor:
    """The same noise for every call, so a scan's score never changes (per-position, batch-independent)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape[1:], generator=gen).to(device).expand(shape)


class MAEDetector(nn.Module):
    name = "mae"

    def __init__(self, mae: MaskedAutoencoder) -> None:
        super().__init__()
        self.mae = mae

    @classmethod
    def from_parts(cls, mae: MaskedAutoencoder, diffusion: GaussianDiffusion, classifier: nn.Module, seed: int):
        return cls(mae)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.mae.score(images)


class ResidualDetector(nn.Module):
    name = "residual"

    def __init__(self, diffusion: GaussianDiffusion, t: int = 5, seed: int = 0) -> None:
        super().__init__()
        self.diffusion, self.t, self.seed = diffusion, t, seed

    @classmethod
    def from_parts(cls, mae: MaskedAutoencoder, diffusion: GaussianDiffusion, classifier: nn.Module, seed: int):
        return cls(diffusion, seed=seed)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x0 = images * 2 - 1
        noise = _fixed_noise(x0.shape, self.seed, x0.device)
        t = torch.full((x0.shape[0],), self.t, device=x0.device, dtype=torch.long)
        eps = self.diffusion.model(self.diffusion.q_sample(x0, t, noise), t)
        return ((eps - noise) ** 2).flatten(1).mean(dim=1)


class DisagreementDetector(nn.Module):
    name = "disagreement"

    def __init__(self, diffusion: GaussianDiffusion, classifier: nn.Module, t: int = 30, seed: int = 0) -> None:
        super().__init__()
        self.diffusion, self.classifier, self.t, self.seed = diffusion, classifier, t, seed

    @classmethod
    def from_parts(cls, mae: MaskedAutoencoder, diffusion: GaussianDiffusion, classifier: nn.Module, seed: int):
        return cls(diffusion, classifier, seed=seed)

    def scores_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scores and, on the way, the classifier's logits on the scans themselves (what a
        defended classifier answers for a scan it leaves unpurified, without computing it again)."""
        x0 = images * 2 - 1
        noise = _fixed_noise(x0.shape, self.seed, x0.device)
        t = torch.full((x0.shape[0],), self.t, device=x0.device, dtype=torch.long)
        den, _ = self.diffusion.predict_x0(self.diffusion.q_sample(x0, t, noise), t)
        logits = self.classifier(images)
        log_p = F.log_softmax(logits, dim=1)
        log_q = F.log_softmax(self.classifier((den + 1) / 2), dim=1)
        return (log_p.exp() * (log_p - log_q)).sum(dim=1), logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scores_and_logits(images)[0]


# the registry: `defense.detector` (and `defense.eval_detectors`) name one of these
DETECTORS: dict[str, type[nn.Module]] = {c.name: c for c in (MAEDetector, ResidualDetector, DisagreementDetector)}
assert tuple(DETECTORS) == DETECTOR_NAMES, "config.DETECTOR_NAMES and the detector registry disagree"


def build_detector(name: str, mae: MaskedAutoencoder, diffusion: GaussianDiffusion, classifier: nn.Module,
                   seed: int = 0) -> nn.Module:
    """Detector `name` from the defense's parts (the MAE, the diffusion model, the classifier)."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector '{name}' ({', '.join(DETECTORS)})")
    return DETECTORS[name].from_parts(mae, diffusion, classifier, seed)
