"""Robust accuracy under the attack suite, scored as a stochastic defense must be (docs/design.md,
Evaluation protocols).

Every attacked scan is answered `draws` times by the model, each time with fresh
purification noise. Per scan that gives three verdicts:
- first draw: what one submission sees;
- majority: the vote of the draws (a defense that answers by vote);
- worst of N: correct on every draw (an attacker who may resubmit N times, DiffHammer).
A deterministic model answers once, and the three agree. Counts are pooled over clients and
every rate carries its 95% Clopper-Pearson interval.

`fixed-noise` scores the fixed-randomness setting (Liu et al., ICLR 2025): each batch of scans
gets one purification noise, known to the attacker and used again by the defender's one answer.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from scipy.stats import binomtest
from torch import nn

from medfedpure.attacks import ATTACKS, WHITE_BOX, Defended, base_attack, build_attack, is_stochastic, parse_attack_name
from medfedpure.metrics import clopper_pearson

VERDICTS = ("first", "majority", "worst")


@dataclass
class Tally:
    """Correct answers per verdict among n scans."""

    n: int = 0
    first: int = 0
    majority: int = 0
    worst: int = 0

    @staticmethod
    def per_scan(correct: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each verdict per scan, from `correct`: (draws, n) booleans, one row per answer of the model."""
        return {"first": correct[0], "majority": correct.float().mean(dim=0) > 0.5, "worst": correct.all(dim=0)}

    @classmethod
    def from_draws(cls, correct: torch.Tensor) -> "Tally":
        rows = cls.per_scan(correct)
        return cls(correct.shape[1], *(int(rows[v].sum()) for v in VERDICTS))

    def __add__(self, other: "Tally") -> "Tally":
        return Tally(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    @staticmethod
    def verdicts(correct: torch.Tensor) -> dict[str, str]:
        """Per scan, each verdict as a string of '1' (correct) and '0' (wrong), in scan order: the
        per-scan outcomes a paired test of two defenses on the same scans needs."""
        return {k: "".join("1" if bool(v) else "0" for v in row) for k, row in Tally.per_scan(correct).items()}

    def rates(self) -> dict:
        """Accuracy and interval per verdict; None where nothing was counted."""
        out: dict = {"n": self.n}
        for verdict in VERDICTS:
            k = getattr(self, verdict)
            out[verdict] = k / self.n if self.n else None
            out[f"{verdict}_ci"] = list(clopper_pearson(k, self.n)) if self.n else None
        return out


@torch.no_grad()
def answer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int, batch: int = 64) -> torch.Tensor:
    """(draws, n) correctness of `draws` independent answers per scan (one for a deterministic model)."""
    draws = draws if is_stochastic(model) else 1
    rows = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        logits = model.sample_logits(xb, draws) if draws > 1 else model(xb)[None]
        rows.append(logits.argmax(-1) == y[i:i + batch])
    return torch.cat(rows, dim=1)


@torch.no_grad()
def flagged(model: nn.Module, x: torch.Tensor, batch: int = 64) -> float | None:
    """Share of scans the detector flags (None for a model without one)."""
    if not is_stochastic(model):
        return None
    return float(torch.cat([model.decide(x[i:i + batch])[1] for i in range(0, len(x), batch)]).float().mean())


@torch.no_grad()
def latency_ms(model: nn.Module, x: torch.Tensor, batch: int = 64) -> float:
    """Milliseconds per scan of one answer (one call of the model, in batches)."""
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        model(x[i:i + batch])
    return 1e3 * (time.perf_counter() - t0) / max(len(x), 1)


def scan_ids(x: torch.Tensor) -> list[str]:
    """A short content hash per scan (its float32 pixels), so a paired test can check that two
    evaluations attacked the very same scans, in the same order."""
    flat = x.detach().float().cpu().contiguous().reshape(len(x), -1).numpy()
    return [hashlib.sha256(row.tobytes()).hexdigest()[:12] for row in flat]


def mcnemar(a: str, b: str) -> dict:
    """McNemar's exact test on two defenses' per-scan outcomes ('1' correct, '0' wrong) on the same
    scans: the two-sided binomial test of the discordant pairs (Fagerland et al., 2013)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a paired test needs outcomes on the same scans (got {len(a)} and {len(b)})")
    only_a = sum(1 for u, v in zip(a, b) if u == "1" and v == "0")
    only_b = sum(1 for u, v in zip(a, b) if u == "0" and v == "1")
    discordant = only_a + only_b
    p = float(binomtest(only_a, discordant, 0.5).pvalue) if discordant else 1.0
    return {"n": len(a), "a_correct": a.count("1"), "b_correct": b.count("1"), "only_a": only_a,
            "only_b": only_b, "p_value": p}


def reseed(model: nn.Module, seed: int) -> None:
    """Fix the purification noise stream (a defended model), so each cell of the evaluation is
    reproducible and does not depend on what ran before it."""
    if isinstance(model, Defended) and model.generator is not None:
        model.generator.manual_seed(seed)


@contextmanager
def fixed_noise(model: nn.Module, seed: int):
    """Within the block, every call of a defended `model` draws the same purification noise (`seed`)."""
    previous = getattr(model, "noise_seed", None)
    model.noise_seed = seed
    try:
        yield model
    finally:
        model.noise_seed = previous


def _same_run(name: str, done: dict, cfg, defended: bool) -> str | None:
    """The eot-pgd entry already in `done` that `name` would repeat exactly (an undefended model,
    the same loss and steps), or None."""
    base, loss, budget = parse_attack_name(name)
    spec = ATTACKS.get(base)  # None: clean
    if defended or spec is None or not spec.same_as_pgd_without_defense:  # on a bare model exactly eot-pgd
        return None

    def key(loss_, budget_):  # an undefended model takes one draw per step whatever the budget says
        return loss_ or cfg.loss, (budget_ or (cfg.adaptive_steps, 1))[0]

    return next((d for d in done if parse_attack_name(d)[0] == WHITE_BOX and key(*parse_attack_name(d)[1:]) ==
                 key(loss, budget)), None)


def _attack_fixed_noise(attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, batch: int,
                        on_batch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed-randomness attack and its answer: per batch one noise (from `seed` and the batch's
    start), the same for every step of the attack and for the defender's single answer, given the
    batch in one call as the attack gave it. (adversarial scans, (1, n) correctness)"""
    parts, rows = [], []
    for i in range(0, len(x), batch):
        with fixed_noise(model, seed * 1_000_003 + i):
            parts.append(attack(x[i:i + batch], y[i:i + batch]))
            rows.append(answer(model, parts[-1], y[i:i + batch], 1, batch=len(parts[-1])))
        if on_batch is not None:
            on_batch(len(parts[-1]))
    return torch.cat(parts), torch.cat(rows, dim=1)


def attack_cost(name: str, cfg) -> int:
    """Model calls (forward and backward) one scan costs under suite attack `name` with the budget of
    `cfg` (an AttackConfig), for a progress bar whose time estimate holds across attacks."""
    return base_attack(name).cost(cfg, parse_attack_name(name)[2])


def run_suite(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: list[str], cfg, seed: int,
              batch: int = 16, on_batch=None, earlier: dict[str, dict] | None = None) -> dict[str, dict]:
    """Clean and every named attack on one client's scans: tallies, share flagged, the bare
    classifier's accuracy on the same inputs, the attack's settings and its time per scan.
    `cfg` is the attack config; `on_batch(work)` is called after every attacked batch with the
    batch's scans times the attack's cost per scan (`attack_cost`). `earlier`: results already made
    on these scans with this seed, kept and not run again (an attack's seed is its place in the list)."""
    defended = isinstance(model, Defended)
    bare = model.classifier if defended else model
    results: dict[str, dict] = dict(earlier or {})
    for k, name in enumerate(["clean", *attacks]):
        t0 = time.perf_counter()
        cost = attack_cost(name, cfg) if name != "clean" else 0
        done = (lambda n, cost=cost: on_batch(n * cost)) if on_batch is not None else None
        if name in results:
            if done is not None:
                done(len(x))
            continue
        same = _same_run(name, results, cfg, defended)
        if same is not None:
            results[name] = {**results[same], "same_as": same}  # not run twice
            if done is not None:
                done(len(x))
            continue
        correct = None
        if name == "clean":
            x_adv, described = x, {"attack": "none"}
        elif base_attack(name).one_draw and defended:
            attack = build_attack(name, model, cfg, seed + 1_000 * k)
            x_adv, correct = _attack_fixed_noise(attack, model, x, y, seed + 1_000 * k + 1, batch, done)
            described = attack.describe()
        else:
            attack = build_attack(name, model, cfg, seed + 1_000 * k)
            reseed(model, seed + 1_000 * k + 1)
            parts = []
            for i in range(0, len(x), batch):
                parts.append(attack(x[i:i + batch], y[i:i + batch]))
                if done is not None:
                    done(len(parts[-1]))
            x_adv, described = torch.cat(parts), attack.describe()
        seconds = time.perf_counter() - t0
        latency = latency_ms(model, x_adv) if name == "clean" else None
        if correct is None:
            reseed(model, seed + 1_000 * k + 2)  # the answers' noise: independent of the attack's
            correct = answer(model, x_adv, y, cfg.draws)
        correct = correct.cpu()
        with torch.no_grad():
            bare_correct = int((torch.cat([bare(x_adv[i:i + 64]) for i in range(0, len(x), 64)]).argmax(1) == y).sum())
        results[name] = {"tally": Tally.from_draws(correct), "outcomes": Tally.verdicts(correct),
                         "draws": int(correct.shape[0]),
                         "flagged": flagged(model, x_adv), "bare_correct": bare_correct, "settings": described,
                         "seconds_per_scan": seconds / max(len(x), 1), "latency_ms": latency,
                         "linf": float((x_adv - x).abs().max()) if len(x) else 0.0}
    return results
