"""Internal evasion (pFedDef's threat, docs/design.md, Threat model): a client crafts PGD on its own personalized
model, from its own test scans, and sends the result to every other client.

`matrix[v][a]` is victim v's accuracy on attacker a's adversarial scans. The diagonal is
each client's white-box accuracy: the same scans, attack seed and cap as the run's final
evaluation round, so it reproduces the per-client figure in metrics.csv. With MedFedPure's
defense in the run folder, the victims also classify through their own defended pipeline
(their detector calibration, their purifier noise seed), the attacker seeing only its own
bare classifier (transfer, paper protocol).

`clean_matrix[v][a]` is the same with attacker a's scans before the attack. Personalized
models are tuned to their own client's labels, so a victim can be wrong on another client's
scans with no attack at all; the clean off-diagonal is that floor, and only the drop from it
to the attacked off-diagonal is the transferred attack's doing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medfedpure.attacks import make_pgd
from medfedpure.config import ExperimentConfig
from medfedpure.defense.pipeline import DefendedClassifier
from medfedpure.evaluation.runs import defended_classifier, load_client_model, load_defense_models
from medfedpure.methods import fingerprint, method_of, purifier_tag, task
from medfedpure.metrics import attacked_index, attacked_positions, batched_accuracy
from medfedpure.reporting.plots import plot_transfer
from medfedpure.runfolder import RunFolder
from medfedpure.storage import read_json, write_csv, write_json


def crafted_examples(model: torch.nn.Module, cfg: ExperimentConfig, client: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Client `client`'s attacked scans (clean, PGD, labels), the PGD made exactly as its
    final-round white-box evaluation made it."""
    _, test_loader, _ = task.client_loaders(cfg, client, cfg.train.rounds)
    attack = make_pgd(model, cfg.attack, seed=task.client_seed(cfg, client, cfg.train.rounds))
    positions = attacked_positions(len(test_loader.dataset), cfg.attack.max_eval_per_client)
    clean, adv, ys, offset = [], [], [], 0
    for x, y in test_loader:
        x, y = x.to(cfg.device), y.to(cfg.device)
        idx = attacked_index(offset, len(y), positions)
        xa, ya = x[idx], y[idx]
        offset += len(y)
        if len(ya):
            clean.append(xa)
            adv.append(attack(xa, ya))
            ys.append(ya)
    return torch.cat(clean), torch.cat(adv), torch.cat(ys)


def _summary(matrix: np.ndarray, prefix: str = "") -> dict[str, float]:
    off = ~np.eye(len(matrix), dtype=bool)  # transfer_matrix refuses a single client: never empty
    return {f"{prefix}diagonal_mean": float(np.mean(np.diag(matrix))),
            f"{prefix}off_diagonal_mean": float(matrix[off].mean())}


def transfer_matrix(run: Path | str, progress: bool = True) -> dict:
    """Victim-by-attacker accuracy (bare, and defended when the run has MedFedPure's defense);
    writes transfer.json, transfer.csv and transfer.png in the run folder."""
    folder = RunFolder(run)
    run, cfg = folder.path, folder.config()
    n = cfg.data.num_clients
    if n < 2:
        raise ValueError(f"internal evasion sends each client's attacks to the others: '{run}' has "
                         f"{n} client (data.num_clients), so there is nothing to transfer to")
    n_classes = task.num_classes(cfg)
    models = [load_client_model(folder, cfg, i, n_classes) for i in range(n)]
    diffusion, mae = load_defense_models(folder, cfg) if method_of(cfg).defended else (None, None)
    victims = {"bare": models}
    if diffusion is not None:
        victims["defended"] = [defended_classifier(folder, cfg, i, models[i], mae, diffusion) for i in range(n)]
    matrices = {kind: np.zeros((n, n)) for kind in victims}
    clean = {kind: np.zeros((n, n)) for kind in victims}
    sizes = []
    for a in tqdm(range(n), desc="internal evasion (attackers)", disable=not progress):
        x_clean, x_adv, y = crafted_examples(models[a], cfg, a)
        sizes.append(len(y))
        for kind, nets in victims.items():
            for v in range(n):
                for k, (x, target) in enumerate(((x_adv, matrices), (x_clean, clean))):
                    if isinstance(nets[v], DefendedClassifier):  # purifier noise fixed per cell, not per order
                        nets[v].generator.manual_seed(task.client_seed(cfg, v, 2 * a + k, "transfer"))
                    target[kind][v, a] = batched_accuracy(nets[v], x, y)
    result = {"method": cfg.method.name, "attack": {**vars(cfg.attack)}, "n_adv_per_attacker": sizes,
              "protocol": "each attacker crafts PGD on its own bare personalized classifier from its own test "
                          "scans; every victim classifies them (rows: victim, columns: attacker)",
              "fingerprint": fingerprint(cfg, "train"), "purifier": purifier_tag(cfg),
              **{kind: {"matrix": m.round(6).tolist(), **_summary(m),
                        "clean_matrix": clean[kind].round(6).tolist(), **_summary(clean[kind], "clean_")}
                 for kind, m in matrices.items()}}
    write_json(run / "transfer.json", result)
    write_csv(run / "transfer.csv", [{"kind": kind, "scans": scans, "victim": v,
                                      **{f"attacker_{a}": m[v, a] for a in range(n)}}
                                     for kind in matrices for scans, m in (("pgd", matrices[kind]),
                                                                           ("clean", clean[kind]))
                                     for v in range(n)])
    panels = {"bare, clean scans": clean["bare"], **{f"{kind}, PGD scans": m for kind, m in matrices.items()}}
    plot_transfer(panels, run / "transfer.png", f"{cfg.name} / {cfg.method.name}: internal evasion")
    return result


def transfer_done(run: Path, cfg: ExperimentConfig) -> bool:
    """Done for this training, in the current format (older files lack the clean matrix)."""
    path = Path(run) / "transfer.json"
    if not path.is_file():
        return False
    saved = read_json(path)
    return (saved.get("fingerprint") == fingerprint(cfg, "train")
            and saved.get("purifier") == purifier_tag(cfg)
            and "clean_matrix" in saved.get("bare", {}))
