"""The defended classifier (docs/design.md, The defense): score -> flag -> purify the flagged -> personalized MoE.

One `nn.Module` from [0,1] images to logits, differentiable end to end when gradients are
requested (no `no_grad`, no `detach` on the path from input to logits, nothing added to
logits), so adaptive attacks can go through it. Flags and depths are discrete decisions
taken from the scores; the purified images themselves carry gradients.

Modes:
- `selective` (the paper): only flagged scans are purified; the rest pass bit-identical.
- `graded`: every scan is purified at least at t_min, flagged scans deeper.
- `off`: the bare classifier, for comparison.

With `votes = N > 1` every scan is purified N times with independent noise and the
classifier's probabilities are averaged (a majority vote in probability), which lowers the
variance a single draw leaves to chance at N times the purification cost.

Nothing is computed twice or kept for nothing: a detector that runs the classifier on the scans
anyway (the disagreement score) hands those logits over, and a scan left unpurified takes them
instead of a second classifier call; scores that only feed the discrete flag / t* decisions
are computed without an autograd graph, and an EOT attack's draws share one detector pass (the
answers and gradients are the same as the full computation's; tests check it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from medfedpure.config import DefenseConfig
from medfedpure.defense.diffusion import GaussianDiffusion, gaussian_noise
from medfedpure.defense.rules import adaptive_depth, rank_flags, threshold_flags

MODES = ("selective", "graded", "off")
RULES = ("rank", "threshold")


def _check_defense(defense: DefenseConfig, tau: float | None) -> None:
    """What a defended classifier needs of its `defense` section and threshold."""
    if defense.mode not in MODES:
        raise ValueError(f"defense mode must be one of {MODES}, not '{defense.mode}'")
    if defense.rule not in RULES:
        raise ValueError(f"decision rule must be one of {RULES}, not '{defense.rule}'")
    if defense.rule == "threshold" and tau is None and defense.mode != "off":
        raise ValueError("the threshold rule needs a calibrated tau (calibrate on clean validation scans)")
    if not 0 <= defense.t_min <= defense.t_max:
        raise ValueError("need 0 <= t_min <= t_max")
    if defense.votes < 1:
        raise ValueError("votes (purifications per scan) must be >= 1")


@dataclass
class DefenseOutput:
    logits: torch.Tensor
    scores: torch.Tensor
    flags: torch.Tensor
    t_star: torch.Tensor
    purified: torch.Tensor
    timings_ms: dict[str, float] = field(default_factory=dict)


class DefendedClassifier(nn.Module):
    """`defense` is the experiment's defense section (mode, rule, kappa, t_min/t_max, sampler,
    sampler_steps, votes); `tau` the threshold calibrated on `calibration_scores`, the detector's
    clean validation scores (None where the rule needs none: rank, or mode off). The detector
    module itself is given, whatever `defense.detector` names."""

    def __init__(self, classifier: nn.Module, detector: nn.Module, diffusion: GaussianDiffusion,
                 defense: DefenseConfig, tau: float | None, calibration_scores: torch.Tensor) -> None:
        super().__init__()
        _check_defense(defense, tau)
        self.classifier = classifier
        self.detector = detector
        self.diffusion = diffusion
        self.defense, self.tau = defense, tau
        self.register_buffer("calibration_scores", calibration_scores.detach().flatten().float(), persistent=False)
        self.generator: torch.Generator | None = None  # set for reproducible purification noise
        # set (`fixed_noise`): every call draws the very same purification noise, the generator
        # reseeded with it first: the fixed-randomness setting (Liu et al., ICLR 2025)
        self.noise_seed: int | None = None
        self.reuse_detector_logits = True  # False: a second classifier call instead (benchmarks/run.py)

    def _fresh_call(self) -> None:
        """Where a call starts drawing noise: with `noise_seed` set, the same noise as every other call."""
        if self.noise_seed is not None:
            if self.generator is None:
                self.generator = torch.Generator()
            self.generator.manual_seed(self.noise_seed)

    def flags_for(self, scores: torch.Tensor) -> torch.Tensor:
        d = self.defense
        if d.mode == "off":
            return torch.zeros_like(scores, dtype=torch.bool)
        if d.rule == "rank":
            return rank_flags(scores, d.kappa)
        return threshold_flags(scores, float(self.tau))

    def depths_for(self, scores: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        d = self.defense
        deep = adaptive_depth(scores, self.calibration_scores, d.t_min, d.t_max)
        if d.mode == "graded":
            return torch.where(flags, deep, torch.full_like(deep, d.t_min))
        return torch.where(flags, deep, torch.zeros_like(deep))

    @property
    def stochastic(self) -> bool:
        """Whether two calls on the same scan can differ (fresh purification noise)."""
        return self.defense.mode != "off"

    def threshold(self) -> float | None:
        """The score above which a scan is flagged (for the rank rule: the clean calibration
        scores' (1 - kappa) quantile, the same share of clean scans); None without a detector."""
        d = self.defense
        if d.mode == "off":
            return None
        if d.rule == "threshold":
            return float(self.tau)
        return float(torch.quantile(self.calibration_scores.double(), 1 - d.kappa))

    def decide(self, images: torch.Tensor, scores: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores, flags and depths t* (discrete decisions taken from the scores). Scores computed
        here carry no autograd graph: no gradient flows through a discrete decision, so the graph
        would be built and thrown away (an attack that differentiates the score, as the
        detector-aware one does, calls the detector itself and may pass its `scores` in)."""
        if scores is None and self.defense.mode == "off":
            scores = torch.zeros(images.shape[0], device=images.device)
        elif scores is None:
            with torch.no_grad():
                scores = self.detector(images)
        flags = self.flags_for(scores)
        return scores, flags, self.depths_for(scores, flags)

    def purify(self, images: torch.Tensor, t_star: torch.Tensor) -> torch.Tensor:
        """One draw: scans with t* > 0 purified with fresh noise, the others as they are. The noise is
        drawn for the whole batch, so a scan's noise does not depend on which other scans are purified
        (with `noise_seed` set it is the same for that scan on every call; DDIM: exactly, DDPM: its
        forward noising)."""
        todo = t_star > 0
        if not bool(todo.any()):
            return images
        noise = gaussian_noise(images.shape, self.generator, images.device)
        if bool(todo.all()):
            return self.diffusion.purify(images, t_star, self.defense.sampler, self.defense.sampler_steps,
                                         self.generator, noise)
        cleaned = self.diffusion.purify(images[todo], t_star[todo], self.defense.sampler,
                                        self.defense.sampler_steps, self.generator, noise[todo])
        purified = images.clone()
        purified[todo] = cleaned
        return purified

    def classify(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Logits of the (vote over the) purified views: log of the mean class probability."""
        if len(views) == 1:
            return self.classifier(views[0])
        log_probs = torch.stack([torch.log_softmax(self.classifier(v), dim=1) for v in views])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(views))

    def purify_draws(self, images: torch.Tensor, draws: int, scores: torch.Tensor | None = None
                     ) -> list[list[torch.Tensor]]:
        """`draws` independent defended inputs, each a list of `votes` purified views (with the noise
        fixed, `draws` copies of the same one)."""
        _, _, t_star = self.decide(images, scores)
        if self.noise_seed is not None:
            self._fresh_call()
            return [[self.purify(images, t_star) for _ in range(self.defense.votes)]] * draws
        return [[self.purify(images, t_star) for _ in range(self.defense.votes)] for _ in range(draws)]

    def sample_logits(self, images: torch.Tensor, draws: int, scores: torch.Tensor | None = None) -> torch.Tensor:
        """(draws, B, C): the defended logits of `draws` independent calls. The detector is
        deterministic, so it runs once for all of them (or takes `scores` already computed)."""
        return torch.stack([self.classify(views) for views in self.purify_draws(images, draws, scores)])

    def unflagged_depths(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """The depth t* of a scan the detector lets through: 0 (selective, off) or t_min (graded)."""
        quiet = torch.zeros(n, dtype=torch.bool, device=device)
        return self.depths_for(torch.zeros(n, device=device), quiet)

    @property
    def unflagged_stochastic(self) -> bool:
        """Whether the answer for an unflagged scan draws purification noise (graded mode)."""
        return bool((self.unflagged_depths(1) > 0).any())

    def unflagged_logits(self, images: torch.Tensor, draws: int) -> torch.Tensor:
        """(draws, B, C): what the defense answers if the detector flags none of `images` (the
        classifier on the scans themselves, or on their purification at t_min in graded mode);
        what an attack that evades the detector has to fool."""
        t_star = self.unflagged_depths(images.shape[0], images.device)
        if self.noise_seed is not None:  # the same noise on every draw
            self._fresh_call()
            return self.classify([self.purify(images, t_star) for _ in range(self.defense.votes)]).expand(
                draws, -1, -1)
        return torch.stack([self.classify([self.purify(images, t_star) for _ in range(self.defense.votes)])
                            for _ in range(draws)])

    def scores_and_unflagged_logits(self, images: torch.Tensor, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The detector's scores and `unflagged_logits`; where an unflagged scan is answered on the
        scan itself (selective mode, one view), the detector's own logits on it, not computed again."""
        if self.defense.mode != "off" and self.reuse_detector_logits and hasattr(self.detector, "scores_and_logits"):
            scores, raw_logits = self.detector.scores_and_logits(images)
        else:
            scores, raw_logits = self.detector(images), None
        if raw_logits is not None and not self.unflagged_stochastic and self.defense.votes == 1:
            return scores, raw_logits.unsqueeze(0)
        return scores, self.unflagged_logits(images, draws)

    def _scores(self, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(scores, the classifier's logits on the scans when the detector computed them anyway and a
        scan left unpurified may take them). Only those logits keep an autograd graph: the scores feed
        discrete decisions alone. Where every scan is purified (graded mode) nothing here does."""
        if self.defense.mode == "off":
            return None, None
        if self.reuse_detector_logits and hasattr(self.detector, "scores_and_logits") and not self.unflagged_stochastic:
            return self.detector.scores_and_logits(images)
        with torch.no_grad():
            return self.detector(images), None

    def _classify_reusing(self, views: list[torch.Tensor], t_star: torch.Tensor,
                          raw_logits: torch.Tensor | None) -> torch.Tensor:
        """`classify(views)`, except that scans left unpurified (t* = 0, one view) take the logits
        the detector already computed on them: the classifier runs only on the purified scans."""
        untouched = t_star <= 0
        if raw_logits is None or len(views) != 1 or not bool(untouched.any()):
            return self.classify(views)
        if bool(untouched.all()):
            return raw_logits
        logits = raw_logits.clone()
        logits[~untouched] = self.classifier(views[0][~untouched])
        return logits

    def details(self, images: torch.Tensor) -> DefenseOutput:
        t0 = time.perf_counter()
        self._fresh_call()
        scores, raw_logits = self._scores(images)
        scores, flags, t_star = self.decide(images, scores)
        t1 = time.perf_counter()
        views = [self.purify(images, t_star) for _ in range(self.defense.votes)]
        t2 = time.perf_counter()
        logits = self._classify_reusing(views, t_star, raw_logits)
        t3 = time.perf_counter()
        n = max(images.shape[0], 1)
        timings = {"score_ms": 1e3 * (t1 - t0) / n, "purify_ms": 1e3 * (t2 - t1) / n,
                   "classify_ms": 1e3 * (t3 - t2) / n}
        return DefenseOutput(logits, scores, flags, t_star, views[0], timings)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.details(images).logits


class RandomDepthPurified(nn.Module):
    """The classifier behind one purification at a depth drawn per scan from [t_min, t_max],
    with fresh noise on every call: the defended classifier's path from input to logits with
    the detector's choice of depth replaced by a draw. Adversarial training crafts its attacks
    through it (gradients flow through the purifier), so the experts learn the purified
    versions of attacks that knew the purifier."""

    def __init__(self, classifier: nn.Module | None, diffusion: GaussianDiffusion, defense: DefenseConfig,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.classifier, self.diffusion, self.generator = classifier, diffusion, generator
        self.t_min, self.t_max = defense.t_min, defense.t_max
        self.sampler, self.steps = defense.sampler, defense.sampler_steps

    def purify(self, images: torch.Tensor) -> torch.Tensor:
        t = torch.randint(self.t_min, self.t_max + 1, (images.shape[0],), generator=self.generator)
        return self.diffusion.purify(images, t.to(images.device), self.sampler, self.steps, self.generator)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.purify(images))
