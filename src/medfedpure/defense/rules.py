"""Decision rules: which scans to purify, and how deep (docs/design.md, The defense).

- rank: flag the top kappa of a batch or dataset, as the paper does;
- threshold: flag scores above tau, calibrated on clean validation scores for a target
  false-positive rate, for one-scan-at-a-time use.
Depth t* grows linearly with the score's percentile among the clean calibration scores.
"""

from __future__ import annotations

import math

import torch


def rank_flags(scores: torch.Tensor, kappa: float) -> torch.Tensor:
    """Boolean mask of the ceil(kappa * n) highest scores."""
    n = scores.numel()
    k = min(n, math.ceil(kappa * n - 1e-9))
    flags = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k > 0:
        flags[torch.topk(scores.detach(), k).indices] = True
    return flags


def calibrate_threshold(clean_scores: torch.Tensor, target_fpr: float) -> float:
    """tau such that a share `target_fpr` of clean scores lies above it."""
    if not 0 < target_fpr < 1:
        raise ValueError("target_fpr must be in (0, 1)")
    return float(torch.quantile(clean_scores.detach().double().flatten(), 1 - target_fpr))


def threshold_flags(scores: torch.Tensor, tau: float) -> torch.Tensor:
    return scores.detach() > tau


def score_percentile(scores: torch.Tensor, calibration: torch.Tensor) -> torch.Tensor:
    """Share of clean calibration scores below each score, in [0,1]."""
    ref = torch.sort(calibration.detach().flatten().to(scores.device)).values
    return torch.searchsorted(ref, scores.detach().contiguous(), right=True).float() / max(ref.numel(), 1)


def adaptive_depth(scores: torch.Tensor, calibration: torch.Tensor, t_min: int, t_max: int) -> torch.Tensor:
    """t* = t_min + percentile * (t_max - t_min), an integer per scan."""
    pct = score_percentile(scores, calibration)
    return torch.round(t_min + pct * (t_max - t_min)).long()
