"""Figures: clean and adversarial accuracy per round (the shape of the paper's Fig. 3)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from medfedpure.storage import atomic_write_bytes  # noqa: E402


def plot_convergence(rows: list[dict], path: Path | str, title: str, attack_label: str) -> None:
    """Weighted-mean clean and PGD accuracy per round, with each client faint behind."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    clients = sorted({r["client"] for r in rows if r["client"] != "mean"})
    for c in clients:
        mine = [r for r in rows if r["client"] == c]
        ax.plot([r["round"] for r in mine], [100 * r["clean_acc"] for r in mine], color="tab:blue", alpha=0.15, lw=1)
        if all(r.get("adv_acc") is not None for r in mine):
            ax.plot([r["round"] for r in mine], [100 * r["adv_acc"] for r in mine], color="tab:red", alpha=0.15, lw=1)
    mean = [r for r in rows if r["client"] == "mean"]
    ax.plot([r["round"] for r in mean], [100 * r["clean_acc"] for r in mean], "o-", color="tab:blue",
            label="clean (weighted mean)")
    if mean and all(r.get("adv_acc") is not None for r in mean):
        ax.plot([r["round"] for r in mean], [100 * r["adv_acc"] for r in mean], "s-", color="tab:red",
                label=f"{attack_label} (weighted mean)")
    ax.set_xlabel("federated round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
