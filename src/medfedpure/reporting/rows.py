"""Typed results: a paired test of two evaluations, an attack's pooled result, a suite's headline and
convergence check, a method's row of the paper's tables, a defense candidate's row, a comparison of
candidates. Each is built once (`evaluation.attack_suite`, `workflows.report`, `workflows.compare`), saved as JSON with `to_dict` (the keys the saved results have
always had) and read back with `from_dict`, so the tables and figures that render them name fields,
not dictionary keys."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from medfedpure.reporting.markdown import percent, with_interval


def _known(cls, data: dict) -> dict:
    """`data` with only the fields `cls` has: a saved result with an extra key still reads; a missing
    required one is a TypeError naming it."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class PairedTest:
    """McNemar's exact test of evaluation b against a (the reference) on the same scans under one
    attack: `only_b` scans right only under b, `only_a` only under a; b beats a when it is more
    accurate with p < 0.05. `unavailable` says why two evaluations could not be paired."""

    against: str = ""
    attack: str = ""
    verdict: str = "first"
    n: int | None = None
    a_correct: int | None = None
    b_correct: int | None = None
    only_a: int | None = None
    only_b: int | None = None
    p_value: float | None = None
    beats: bool | None = None
    unavailable: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> PairedTest:
        return cls(**_known(cls, data))

    def cell(self) -> str:
        """The table cell: 'b-only vs a-only, p = ...', or n/a."""
        if self.unavailable is not None or self.p_value is None:
            return "n/a"
        return f"{self.only_b} vs {self.only_a}, p = {self.p_value:.3g}"


@dataclass(frozen=True)
class AttackResult:
    """One attack (or clean) of a suite evaluation pooled over the hospitals (`evaluation.json`'s
    `suite` entries): scans, each verdict's accuracy with its 95% interval (first draw, majority and
    worst of the N answers), the share flagged, the bare classifier's accuracy, seconds per scan and
    answer latency, the attack's settings, and the per-scan outcomes a paired test needs."""

    client: str = "all"
    attack: str = ""
    n: int = 0
    first: float | None = None
    first_ci: list | None = None
    majority: float | None = None
    majority_ci: list | None = None
    worst: float | None = None
    worst_ci: list | None = None
    flagged: float | None = None
    bare_acc: float | None = None
    seconds_per_scan: float | None = None
    latency_ms: float | None = None
    settings: dict | None = None
    draws: int | None = None
    max_linf: float = 0.0
    knows_the_defense: str = ""
    outcomes: dict | None = None  # per verdict, '1'/'0' per scan in the evaluation's scan order

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["outcomes"] is None:
            del out["outcomes"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> AttackResult:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class Headline:
    """A suite evaluation's headline (`evaluation.json`'s `headline`): the lowest first-draw accuracy
    over the attacks that know the defense, with its 95% interval, the attack, its settings and the
    number of scans."""

    attack: str
    first: float
    first_ci: list
    n: int
    settings: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Headline:
        return cls(**_known(cls, data))

    def label(self, budget: str) -> str:
        """'eot-pgd:margin (50 steps x 4 draws, margin), 480 scans' (`budget`: the settings in words)."""
        return f"{self.attack} ({budget}), {self.n} scans"


@dataclass(frozen=True)
class Convergence:
    """One attack at a stronger budget beside the same attack at the suite's, on the same `n` scans
    (`evaluation.json`'s `convergence` entries): their first-draw accuracies with 95% intervals, and
    whether the stronger one is lower beyond the usual one's interval (the budget has not converged).
    Scan by scan (first draw, where the outcomes were kept): how many scans only the stronger budget
    fooled, how many only the usual one, and McNemar's exact p of the two."""

    attack: str
    stronger: str
    first: float
    first_ci: list
    stronger_first: float
    stronger_first_ci: list
    lower_beyond_interval: bool
    n: int | None = None  # None in evaluations made before it was kept
    only_stronger: int | None = None  # fooled at the stronger budget, answered right at the usual one
    only_usual: int | None = None
    p_value: float | None = None

    def cell(self) -> str:
        """'eot-pgd:margin@200x20 90.0 vs 92.0 [80.8, 97.8], 50 scans (2 fooled only by it, 1 only by the
        usual budget, p = 1): converged'."""
        verdict = "NOT converged" if self.lower_beyond_interval else "converged"
        scans = f", {self.n} scans" if self.n is not None else ""
        paired = (f" ({self.only_stronger} fooled only by it, {self.only_usual} only by the usual budget, "
                  f"p = {self.p_value:.3g})" if self.p_value is not None else "")
        return (f"{self.stronger} {percent(self.stronger_first)} vs {with_interval(self.first, self.first_ci)}"
                f"{scans}{paired}: {verdict}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Convergence:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class MethodRow:
    """A row of the paper's Table I / II (`tables.json`'s rows): a method on the run's setting, or ours
    behind its defense. Accuracies in %: clean, adv (the paper's protocol: PGD on the classifier), the
    adaptive column (the lowest first-draw accuracy over the attacks that know the defense, its 95%
    interval and attack; None where no suite ran) and the paper's figures (None where it has none)."""

    table: str | None = None
    data: str | None = None
    resolution: int | None = None
    clients: int | None = None
    attack: str | None = None
    model: str = ""
    method: str = ""
    protocol: str = ""
    clean: float | None = None
    adv: float | None = None
    adaptive: float | None = None
    adaptive_ci: list | None = None
    adaptive_attack: str | None = None
    paper_clean: float | None = None
    paper_adv: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MethodRow:
        return cls(**_known(cls, data))

    def adaptive_cell(self) -> str:
        """'**50.0** [31.3, 68.7] its attack', or empty where there is no adaptive figure."""
        if self.adaptive is None:
            return ""
        lo, hi = self.adaptive_ci
        return f"**{self.adaptive}** [{lo}, {hi}] {self.adaptive_attack}"


@dataclass(frozen=True)
class CandidateRow:
    """One defense candidate under the study's attacks: clean and strongest-attack first-draw accuracy
    with their 95% intervals, majority under that attack and the lowest worst of N, each attack's first draw,
    latency, and the paired test against the study's first candidate (None for the first)."""

    name: str
    run: str
    clean: float
    clean_ci: list
    clean_n: int
    robust: float
    robust_ci: list
    robust_n: int
    strongest: str
    budget: str
    robust_majority: float | None
    robust_worst: float | None
    per_attack: dict
    latency_ms: float | None = None
    overrides: list = field(default_factory=list)
    note: str = ""
    defense: dict | None = None
    paired: PairedTest | None = None
    convergence: list | None = None  # of Convergence: the strongest attack at a larger budget (candidate's `convergence:`)
    # the attack whose worst of N is lowest (robust_worst is under it), and the paired test with the first
    # candidate at worst of N under it: what an attacker who may resubmit a scan N times gets
    worst_attack: str | None = None
    paired_worst: PairedTest | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("paired", "paired_worst"):
            out[key] = getattr(self, key).to_dict() if getattr(self, key) is not None else None
        out["convergence"] = [c.to_dict() for c in self.convergence] if self.convergence is not None else None
        optional = ("paired", "convergence", "worst_attack", "paired_worst")
        return {k: v for k, v in out.items() if v is not None or k not in optional}

    @classmethod
    def from_dict(cls, data: dict) -> CandidateRow:
        known = _known(cls, data)
        for key in ("paired", "paired_worst"):
            if known.get(key) is not None:
                known[key] = PairedTest.from_dict(known[key])
        if known.get("convergence") is not None:
            known["convergence"] = [Convergence.from_dict(c) for c in known["convergence"]]
        return cls(**known)


@dataclass(frozen=True)
class Comparison:
    """Defense candidates under the same attacks on the same scans (`compare-defenses`)."""

    spec: str
    attacks: list
    max_per_client: int | None
    overrides: list
    rows: list  # of CandidateRow, the first the reference

    def to_dict(self) -> dict:
        return {"spec": self.spec, "attacks": list(self.attacks), "max_per_client": self.max_per_client,
                "overrides": list(self.overrides), "rows": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, data: dict) -> Comparison:
        known = _known(cls, data)
        known["rows"] = [r if isinstance(r, CandidateRow) else CandidateRow.from_dict(r) for r in known["rows"]]
        return cls(**known)
