"""Evaluate a trained federation on any labelled folder (`medfedpure evaluate`): every chosen
client's personalized model, bare and defended, clean and attacked, with the calibration it
saved. Scans no client trained on are the point. Without a folder, each client is evaluated
on its own test split from the run (the scans of the run's final evaluation), which is how a
stronger attack (`attack.steps=50`) is tried on a trained run without retraining."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medfedpure.config import ExperimentConfig, apply_overrides
from medfedpure.data import load_dataset, make_loader
from medfedpure.defense import DefendedClassifier
from medfedpure.defense.rules import calibrate_threshold
from medfedpure.defense.trainer import load_pretrained
from medfedpure.evaluation.defense_eval import build_detector, evaluate_defense
from medfedpure.evaluation.metrics import evaluate_accuracy
from medfedpure.federation import task
from medfedpure.reporting.results import defense_rows, weighted_mean
from medfedpure.storage import atomic_write_text, load_tensors, read_json, write_csv, write_json


class RunFolderError(FileNotFoundError):
    """A run folder that lacks what an evaluation needs, or whose files do not match its config."""


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise RunFolderError(f"run folder is incomplete: {what} '{path}' is missing")
    return path


def dataset_for_folder(dataset: str, folder: Path) -> str:
    """How to load `folder` for a run trained on `dataset`.

    A plain class-folder set (what `medfedpure holdout` writes, or the built-in set written out)
    loads as "folder" even for a CIFAR-10 run; the class-names check that follows still
    guards the label order. Br35H needs no fallback: its layout is already yes/ and no/ class
    folders, and loading it as "br35h" ignores extra folders beside them (the Kaggle pred/).
    """
    if dataset == "synthetic":
        return "folder"
    if dataset == "cifar10" and not _looks_like_cifar10(folder) and _has_class_folders(folder):
        return "folder"
    return dataset


def _looks_like_cifar10(folder: Path) -> bool:
    return any((folder / name).is_dir() for name in ("train", "test", "cifar-10-batches-py")) or \
        (folder / "data_batch_1").exists()


def _has_class_folders(folder: Path) -> bool:
    return folder.is_dir() and sum(1 for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) >= 2


def load_client_model(run: Path, cfg: ExperimentConfig, client: int, n_classes: int,
                      experts: dict | None = None):
    """Client `client`'s personalized classifier as trained: the global experts and its own part."""
    if experts is None:
        experts = load_tensors(_need(run / "global_experts.safetensors", "global experts"))
    folder = run / "clients" / f"client_{client:02d}"
    model = task.new_model(cfg, n_classes, init_seed=0)
    try:
        model.load_experts(experts)
        model.load_gate(load_tensors(_need(folder / "gate.safetensors", f"client {client}'s gate")))
    except (KeyError, RuntimeError) as err:  # other arrays, or other shapes (an edited model section)
        reason = str(err).strip().splitlines()[0][:300]
        raise RunFolderError(f"checkpoints in '{run}' do not match its config.json: {reason}") from err
    return model.eval()


OWN_TEST_OVERRIDES = ("attack.", "defense.")


@dataclass
class RunUnderTest:
    """A trained run, ready to evaluate: its config (with the overrides), every chosen client's
    scans, and the models the clients share."""

    run: Path
    cfg: ExperimentConfig
    classes: list[str]
    loaders: dict[int, DataLoader]
    n_images: int
    own_test: bool
    experts: dict[str, torch.Tensor]
    mae: nn.Module | None
    diffusion: nn.Module | None

    @property
    def defended(self) -> bool:
        return self.mae is not None

    @property
    def data_label(self) -> str:
        return "each client's own test split" if self.own_test else str(self.cfg.data.root)

    def model(self, client: int) -> nn.Module:
        return load_client_model(self.run, self.cfg, client, len(self.classes), self.experts)

    def defended_model(self, client: int, model: nn.Module) -> DefendedClassifier:
        return defended_classifier(self.run, self.cfg, client, model, self.mae, self.diffusion)

    def default_out(self, suffix: str = "") -> Path:
        name = "own-test" if self.own_test else Path(self.cfg.data.root).name
        return self.run / "evaluations" / f"{name}{suffix}"


def open_run(run: Path | str, data: Path | str | None, clients: str = "all",
             overrides: list[str] | None = None) -> RunUnderTest:
    """`data=None`: every client on its own test split, the scans of the run's final evaluation."""
    run = Path(run)
    config = _need(run / "config.json", "config")
    cfg = ExperimentConfig.from_dict(read_json(config), source=str(config))
    own_test = data is None
    if own_test:
        changed = [o for o in overrides or [] if not o.startswith(OWN_TEST_OVERRIDES)]
        if changed:
            raise ValueError(f"evaluating on the run's own test splits keeps its data and model: only attack.* "
                             f"and defense.* overrides apply, not {changed}")
    cfg = apply_overrides(cfg, overrides or []).validate()
    classes = read_json(_need(run / "partition.json", "partition record"))["classes"]
    if clients != "all" and not (clients.isdigit() and int(clients) < cfg.data.num_clients):
        raise ValueError(f"--client must be 'all' or a client index 0-{cfg.data.num_clients - 1} "
                         f"(the run has {cfg.data.num_clients} clients), not '{clients}'")
    ids = range(cfg.data.num_clients) if clients == "all" else [int(clients)]
    if own_test:
        loaders = {i: task.client_loaders(cfg, i, cfg.train.rounds)[1] for i in ids}
        n_images = sum(len(loader.dataset) for loader in loaders.values())
    else:
        cfg.data.dataset = dataset_for_folder(cfg.data.dataset, Path(data))
        cfg.data.root = str(data)
        cfg.data.max_per_class = None
        images = load_dataset(cfg.data, seed=cfg.seed)
        if list(images.classes) != list(classes):
            raise RunFolderError(f"'{data}' has classes {list(images.classes)}, the run was trained on {classes}")
        loaders = dict.fromkeys(ids, make_loader(images, np.arange(len(images)), 64, train=False))
        n_images = len(images)
    experts = load_tensors(_need(run / "global_experts.safetensors", "global experts"))
    defended = cfg.defense.enabled and (run / "mae.safetensors").is_file() and (run / "diffusion.safetensors").is_file()
    mae = load_pretrained("mae", cfg, run / "mae.safetensors") if defended else None
    diffusion = load_pretrained("diffusion", cfg, run / "diffusion.safetensors") if defended else None
    return RunUnderTest(run, cfg, classes, loaders, n_images, own_test, experts, mae, diffusion)


def defended_classifier(run: Path, cfg: ExperimentConfig, client: int, model: nn.Module, mae, diffusion
                        ) -> DefendedClassifier:
    """Client `client`'s defended classifier as configured (`defense.detector`, `mode`, ...), with
    the threshold calibrated on its own clean validation scores and its own purifier noise seed."""
    d = cfg.defense
    calibration = load_tensors(_need(run / "clients" / f"client_{client:02d}" / "detector_calibration.safetensors",
                                     f"client {client}'s calibration"))
    if d.detector not in calibration:
        raise RunFolderError(f"client {client} has no calibration for the '{d.detector}' detector")
    seed = task.client_seed(cfg, client, 10_000)
    scores = calibration[d.detector]
    defended = DefendedClassifier(model, build_detector(d.detector, mae, diffusion, model, seed), diffusion,
                                  d, calibrate_threshold(scores, d.target_fpr), scores).eval()
    defended.generator = torch.Generator().manual_seed(seed)
    return defended


def evaluate_run(run: Path | str, data: Path | str | None, clients: str = "all",
                 overrides: list[str] | None = None, out: Path | str | None = None, progress: bool = True) -> dict:
    """Paper protocol: PGD on each client's bare classifier, then every configured detector and
    mode. `data=None`: each client's own test split (all of its scans attacked, whatever the
    run's `attack.max_eval_per_client`)."""
    r = open_run(run, data, clients, overrides)
    cfg = r.cfg
    metrics, plain = [], []
    for i in tqdm(list(r.loaders), desc="evaluating clients", unit="client", disable=not progress):
        loader = r.loaders[i]
        model = r.model(i)
        attack = task.make_attack(model, cfg, seed=task.client_seed(cfg, i, 20_000))
        if r.defended:
            folder = r.run / "clients" / f"client_{i:02d}"
            calibration = load_tensors(_need(folder / "detector_calibration.safetensors", f"client {i}'s calibration"))
            d = cfg.defense
            detectors = [name for name in d.eval_detectors if name in calibration]
            m, _, _ = evaluate_defense(model, r.mae, r.diffusion, calibration, loader, attack, d, detectors,
                                       list(d.eval_modes), seed=task.client_seed(cfg, i, 20_000))
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
    if defended:
        lines += ["| client | detector | mode | bare clean | bare adv | clean | adv | AUROC |", "|---|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            lines.append(f"| {r['client']} | {r['detector']} | {r['mode']} | {100 * r['bare_clean_acc']:.2f} | "
                         f"{100 * r['bare_adv_acc']:.2f} | {100 * r['clean_acc']:.2f} | {100 * r['adv_acc']:.2f} | "
                         f"{r['auroc']:.3f} |")
    else:
        lines += ["| client | clean | adv |", "|---|---|---|"]
        for r in result["rows"]:
            lines.append(f"| {r['client']} | {100 * r['clean_acc']:.2f} | {100 * r['adv_acc']:.2f} |")
    return "\n".join(lines) + "\n"
