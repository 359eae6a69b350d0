"""Per-round metrics as rows (one per client plus the weighted mean) and the run's metadata."""

from __future__ import annotations

import importlib.metadata as md
import platform
import subprocess
from pathlib import Path

ROUND_FIELDS = ("train_loss", "gate_entropy", "clean_acc", "adv_acc", "test_loss")
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


def environment_info(seed: int) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {"seed": seed, "python": platform.python_version(), "platform": platform.platform(),
            "packages": versions, "git_commit": git_commit()}


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
