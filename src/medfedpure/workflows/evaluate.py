"""`medfedpure evaluate` under the paper's protocol: every chosen client's personalized model,
bare and defended, clean and attacked (PGD crafted on the bare classifier, then every configured
detector and mode), on any labelled folder (scans no client trained on are the point) or on each
client's own test split (how a stronger attack, `attack.steps=50`, is tried without retraining)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from medfedpure.attacks import make_pgd
from medfedpure.defense.evaluation import evaluate_defense
from medfedpure.evaluation.runs import open_run
from medfedpure.methods import task
from medfedpure.metrics import evaluate_accuracy
from medfedpure.reporting.markdown import percent, table
from medfedpure.reporting.results import defense_rows, weighted_mean
from medfedpure.storage import atomic_write_text, write_csv, write_json


def evaluate_run(run: Path | str, data: Path | str | None, clients: str = "all",
                 overrides: list[str] | None = None, out: Path | str | None = None, progress: bool = True) -> dict:
    """Paper protocol: PGD on each client's bare classifier, then every configured detector and
    mode. `data=None`: each client's own test split (all of its scans attacked, whatever the
    run's `attack.max_eval_per_client`)."""
    r = open_run(run, data, clients, overrides, progress)
    cfg = r.cfg
    metrics, plain = [], []
    for i in tqdm(list(r.loaders), desc="evaluating clients", unit="client", disable=not progress):
        loader = r.loaders[i]
        model = r.model(i)
        attack = make_pgd(model, cfg.attack, seed=task.client_seed(cfg, i, purpose="evaluate"))
        if r.defended:
            calibration = r.folder.calibration(i)
            d = cfg.defense
            detectors = [name for name in d.eval_detectors if name in calibration]
            m, _, _ = evaluate_defense(model, r.mae, r.diffusion, calibration, loader, attack, d, detectors,
                                       list(d.eval_modes), seed=task.client_seed(cfg, i, purpose="evaluate"))
            cfg.defense.eval_detectors = detectors
            metrics.append({"partition-id": i, "num-examples": int(m.pop("n_test")), **m})
        else:
            plain.append({"client": i, **evaluate_accuracy(model, loader, attack, device=cfg.device)})
    target = Path(out) if out else r.default_out()
    result = {"run": str(r.run), "data": r.data_label, "n_images": r.n_images, "attack": asdict(cfg.attack),
              "protocol": "PGD on each client's classifier, then its defense", "clients": list(r.loaders)}
    if r.defended:
        rows = defense_rows(metrics, cfg)
        result["rows"] = rows
        write_csv(target / "evaluation.csv", rows)
    else:
        result["rows"] = plain + [_weighted_mean(plain)]
        write_csv(target / "evaluation.csv", result["rows"])
    write_json(target / "evaluation.json", result)
    atomic_write_text(target / "evaluation.md", _markdown(result, r.defended))
    result["out"] = str(target)
    return result


def _weighted_mean(rows: list[dict]) -> dict:
    """The clients' mean weighted by their scans (attacked scans for the attacked figures)."""
    return {"client": "mean", "clean_acc": weighted_mean(rows, "clean_acc"),
            "test_loss": weighted_mean(rows, "test_loss"), "n_test": sum(r["n_test"] for r in rows),
            "adv_acc": weighted_mean(rows, "adv_acc", "n_adv"), "n_adv": sum(r["n_adv"] for r in rows),
            "clean_acc_attacked": weighted_mean(rows, "clean_acc_attacked", "n_adv")}


def _markdown(result: dict, defended: bool) -> str:
    lines = [f"# {result['run']} on {result['data']} ({result['n_images']} scans)", "",
             f"attack: {json.dumps(result['attack'])}", ""]
    pct = lambda x: percent(x, 2)  # noqa: E731
    if defended:
        lines.append(table(["client", "detector", "mode", "bare clean", "bare adv", "clean", "adv", "AUROC"],
                           [[r["client"], r["detector"], r["mode"], pct(r["bare_clean_acc"]), pct(r["bare_adv_acc"]),
                             pct(r["clean_acc"]), pct(r["adv_acc"]), f"{r['auroc']:.3f}"] for r in result["rows"]]))
    else:
        lines.append(table(["client", "clean", "adv"],
                           [[r["client"], pct(r["clean_acc"]), pct(r["adv_acc"])] for r in result["rows"]]))
    return "\n".join(lines) + "\n"
