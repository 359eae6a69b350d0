"""Figures: clean and adversarial accuracy per round (the shape of the paper's Fig. 3)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from medfedpure.reporting.rows import AttackResult, Headline  # noqa: E402
from medfedpure.storage import atomic_write_bytes  # noqa: E402


def _save(fig, path: Path | str, bbox_inches: str | None = None) -> None:
    """Write the figure as a PNG (atomically) and close it. Laid out with tight_layout, or,
    with bbox_inches="tight", cropped to its contents instead (a colorbar shared by several
    axes, which tight_layout does not handle)."""
    if bbox_inches is None:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches=bbox_inches)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_defense_examples(examples: dict, path: Path | str, title: str) -> None:
    """Rows of scans: original, attacked, MAE error map, purified."""
    n = len(examples["original"])
    fig, axes = plt.subplots(n, 4, figsize=(8, 2.1 * n), dpi=110, squeeze=False)
    grid = int(examples["mae_error"].shape[1] ** 0.5)
    for i in range(n):
        panels = [(examples["original"][i], "original"), (examples["attacked"][i], "attacked"),
                  (examples["mae_error"][i].reshape(grid, grid), "MAE error"), (examples["purified"][i], "purified")]
        for ax, (img, name) in zip(axes[i], panels):
            img = img.detach().cpu()
            if img.dim() == 3:
                ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
            else:
                ax.imshow(img.numpy(), cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def plot_transfer(matrices: dict, path: Path | str, title: str) -> None:
    """Victim-by-attacker accuracy heat maps (internal evasion), one panel per victim pipeline."""
    kinds = list(matrices)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.9), dpi=110, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        m = 100 * matrices[kind]
        im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
        n = len(m)
        if n <= 12:
            for v in range(n):
                for a in range(n):
                    ax.text(a, v, f"{m[v, a]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if m[v, a] < 60 else "black")
        ax.set_xlabel("attacker client")
        ax.set_ylabel("victim client")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # clients are whole
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{kind} (victim accuracy %)", fontsize=9)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path, bbox_inches="tight")


def plot_method_comparison(rows: list, path: Path | str, title: str) -> None:
    """Clean and adversarial accuracy per method (`reporting.rows.MethodRow`; ours beside the paper's, hatched)."""
    rows = [r for r in rows if r.clean is not None or r.paper_clean is not None]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 4.0), dpi=110)
    xs = range(len(rows))
    series = [("clean", "ours clean", "tab:blue", None), ("adv", "ours PGD (paper protocol)", "tab:red", None)]
    if any(r.adaptive is not None for r in rows):
        series.append(("adaptive", "ours, attack that knows the defense", "tab:purple", None))
    series += [("paper_clean", "paper clean", "tab:blue", "//"), ("paper_adv", "paper PGD", "tab:red", "//")]
    series = [s for s in series if any(getattr(r, s[0]) is not None for r in rows)]  # no legend entry without bars
    w = 0.8 / len(series)
    for k, (key, label, color, hatch) in enumerate(series):
        vals = [float("nan") if getattr(r, key) is None else getattr(r, key) for r in rows]  # missing: no bar, not 0
        ax.bar([x + (k - (len(series) - 1) / 2) * w for x in xs], vals, w, label=label, color=color,
               alpha=0.35 if hatch else 0.9, hatch=hatch, edgecolor=color)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r.method for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 118)  # room for the legend above the 100% bars
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def plot_suite(result: dict, path: Path | str) -> None:
    """Accuracy under each attack of the suite: first draw with its 95% interval, majority and
    worst of N beside it."""
    suite = {name: AttackResult.from_dict(p) for name, p in result["suite"].items()}
    names = list(suite)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.25 * len(names)), 3.8), dpi=110)
    w = 0.26
    for k, (verdict, color) in enumerate((("first", "tab:blue"), ("majority", "tab:green"), ("worst", "tab:red"))):
        vals = [100 * (getattr(suite[n], verdict) or 0.0) for n in names]
        xs = [i + (k - 1) * w for i in range(len(names))]
        err = None
        if verdict == "first":
            cis = [suite[n].first_ci for n in names]
            err = [[v - 100 * lo for v, (lo, _) in zip(vals, cis)], [100 * hi - v for v, (_, hi) in zip(vals, cis)]]
        ax.bar(xs, vals, w, yerr=err, capsize=3, color=color, alpha=0.85,
               label={"first": "first draw (95% CI)", "majority": "majority", "worst": "worst of N"}[verdict])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    h = Headline.from_dict(result["headline"])
    ax.set_title(f"{Path(result['run']).name}: headline {100 * h.first:.1f}% under {h.attack} ({h.n} scans)",
                 fontsize=9)
    _save(fig, path)


def plot_frontier(rows: list, path: Path | str) -> None:
    """Clean against robust accuracy per defense candidate, with 95% intervals on both; a hollow
    marker, joined by a dotted line, at its worst of N resubmissions where that is lower."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=110)
    for k, r in enumerate(rows):  # reporting.rows.CandidateRow
        x, y = 100 * r.robust, 100 * r.clean
        xerr = [[x - 100 * r.robust_ci[0]], [100 * r.robust_ci[1] - x]]
        yerr = [[y - 100 * r.clean_ci[0]], [100 * r.clean_ci[1] - y]]
        color = plt.cm.tab10(k % 10)
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", color=color, capsize=3, label=r.name)
        if r.robust_worst is not None and r.robust_worst < r.robust:
            ax.plot([100 * r.robust_worst, x], [y, y], ":", color=color)
            ax.plot([100 * r.robust_worst], [y], "o", mfc="none", color=color)
    if any(r.robust_worst is not None and r.robust_worst < r.robust for r in rows):
        ax.plot([], [], "o", mfc="none", color="gray", label="worst of N resubmissions")
    ax.set_xlabel("robust accuracy % (strongest attack, first draw)")
    ax.set_ylabel("clean accuracy % (first draw)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("defense candidates: clean against robust", fontsize=9)
    _save(fig, path)
