"""Per-round metrics as rows (one per client plus the weighted mean) and the run's metadata."""

from __future__ import annotations

import importlib.metadata as md
import platform
import subprocess
from pathlib import Path

# clean_acc_attacked: clean accuracy on the scans the (capped) attack ran on, adv_acc's pair
ROUND_FIELDS = ("train_loss", "gate_entropy", "adv_share", "clean_acc", "adv_acc", "test_loss", "clean_acc_attacked")
PACKAGES = ("medfedpure", "torch", "torchvision", "flwr", "ray", "numpy", "safetensors")


def round_rows(history: dict[int, dict]) -> list[dict]:
    """Flatten the strategy's history: one row per (round, client) and one 'mean' row per round."""
    rows = []
    for rnd in sorted(history):
        rec = history[rnd]
        for client in sorted(rec["clients"]):
            c = rec["clients"][client]
            rows.append({"round": rnd, "client": client, "n_train": c.get("n_train"), "n_test": c.get("n_test"),
                         **{f: c.get(f) for f in ROUND_FIELDS}})
        mean = {**rec.get("train", {}), **rec.get("evaluate", {})}
        rows.append({"round": rnd, "client": "mean",
                     "n_train": sum(c.get("n_train", 0) for c in rec["clients"].values()),
                     "n_test": sum(c.get("n_test", 0) for c in rec["clients"].values()),
                     **{f: mean.get(f) for f in ROUND_FIELDS}})
    return rows


def mean_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["client"] == "mean"]


def weighted_mean(rows: list[dict], key: str, weight: str = "n_test") -> float | None:
    """The clients' figure weighted by their scans (None when no client has any)."""
    total = sum(r[weight] for r in rows)
    return sum(r[key] * r[weight] for r in rows) / total if total else None


def environment_info(seed: int) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {"seed": seed, "python": platform.python_version(), "platform": platform.platform(),
            "packages": versions, "git_commit": git_commit(), "git_dirty": git_dirty()}


def _git(args: list[str], where: Path | None) -> str | None:
    try:
        where = where or Path(__file__).resolve().parent
        out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=5)
        return out.stdout if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit(where: Path | None = None) -> str | None:
    out = _git(["rev-parse", "HEAD"], where)
    return (out or "").strip() or None


def git_dirty(where: Path | None = None) -> bool | None:
    """True when tracked files differ from the commit: the commit alone does not reproduce the run."""
    out = _git(["status", "--porcelain", "--untracked-files=no"], where)
    return None if out is None else bool(out.strip())


DEFENSE_FIELDS = ("bare_clean_acc", "bare_adv_acc", "clean_acc", "adv_acc", "auroc", "tpr_at_tau", "fpr_at_tau",
                  "clean_purified", "adv_purified", "clean_mean_t", "adv_mean_t", "clean_score_ms",
                  "clean_purify_ms", "clean_classify_ms", "adv_score_ms", "adv_purify_ms", "adv_classify_ms")


def defense_rows(client_metrics: list[dict], cfg) -> list[dict]:
    """One row per (client, detector, mode) plus test-size-weighted 'mean' rows, each saying over how
    many hospitals it is (a hospital lost in the defended evaluation is named in summary.json)."""
    rows = []
    for m in sorted(client_metrics, key=lambda m: int(m["partition-id"])):
        for detector in cfg.defense.eval_detectors:
            for mode in cfg.defense.eval_modes:
                key = f"{mode}.{detector}"
                row = {"client": int(m["partition-id"]), "detector": detector, "mode": mode, "rule": cfg.defense.rule,
                       "n_test": int(m["num-examples"]), "bare_clean_acc": m["bare.clean_acc"],
                       "bare_adv_acc": m["bare.adv_acc"], "auroc": m[f"{detector}.auroc"],
                       "tpr_at_tau": m[f"{detector}.tpr_at_tau"], "fpr_at_tau": m[f"{detector}.fpr_at_tau"]}
                for f in DEFENSE_FIELDS:
                    if f"{key}.{f}" in m:
                        row[f] = m[f"{key}.{f}"]
                rows.append(row)
    means = []
    for detector in cfg.defense.eval_detectors:
        for mode in cfg.defense.eval_modes:
            group = [r for r in rows if r["detector"] == detector and r["mode"] == mode]
            mean = {"client": "mean", "detector": detector, "mode": mode, "rule": cfg.defense.rule,
                    "n_test": sum(r["n_test"] for r in group), "hospitals": len(group)}
            mean.update({f: weighted_mean(group, f) or 0.0 for f in DEFENSE_FIELDS})
            means.append(mean)
    return rows + means
