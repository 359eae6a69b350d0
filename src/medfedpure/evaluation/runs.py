"""A trained run opened for evaluation: its config (with attack/defense overrides), every chosen
client's scans (its own test split, or any labelled folder), each client's personalized
classifier as trained, and its defended classifier with the calibration it saved."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medfedpure.config import ExperimentConfig, apply_overrides
from medfedpure.data import load_dataset, make_loader
from medfedpure.defense import DefendedClassifier
from medfedpure.defense.detectors import build_detector
from medfedpure.defense.rules import calibrate_threshold
from medfedpure.defense.trainer import load_pretrained
from medfedpure.methods import new_model, task
from medfedpure.runfolder import RunFolder, RunFolderError


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


def load_client_model(run: Path | RunFolder, cfg: ExperimentConfig, client: int, n_classes: int,
                      experts: dict | None = None):
    """Client `client`'s personalized classifier as trained: the global experts and its own part."""
    folder = RunFolder.of(run)
    if experts is None:
        experts = folder.experts()
    model = new_model(cfg, n_classes, init_seed=0)
    try:
        model.load_experts(experts)
        model.load_gate(folder.gate(client))
    except (KeyError, RuntimeError) as err:  # other arrays, or other shapes (an edited model section)
        reason = str(err).strip().splitlines()[0][:300]
        raise RunFolderError(f"checkpoints in '{folder.path}' do not match its config.json: {reason}") from err
    return model.eval()


OWN_TEST_OVERRIDES = ("attack.", "defense.")


@dataclass
class RunUnderTest:
    """A trained run, ready to evaluate: its config (with the overrides), every chosen client's
    scans, and the models the clients share."""

    run: Path
    folder: RunFolder
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
        return load_client_model(self.folder, self.cfg, client, len(self.classes), self.experts)

    def defended_model(self, client: int, model: nn.Module) -> DefendedClassifier:
        return defended_classifier(self.folder, self.cfg, client, model, self.mae, self.diffusion)

    def default_out(self, suffix: str = "") -> Path:
        name = "own-test" if self.own_test else Path(self.cfg.data.root).name
        return self.folder.evaluations / f"{name}{suffix}"


def open_run(run: Path | str, data: Path | str | None, clients: str = "all",
             overrides: list[str] | None = None, progress: bool = True) -> RunUnderTest:
    """`data=None`: every client on its own test split, the scans of the run's final evaluation."""
    folder = RunFolder(run)
    cfg = trained = folder.config()
    own_test = data is None
    if own_test:
        changed = [o for o in overrides or [] if not o.startswith(OWN_TEST_OVERRIDES)]
        if changed:
            raise ValueError(f"evaluating on the run's own test splits keeps its data and model: only attack.* "
                             f"and defense.* overrides apply, not {changed}")
    cfg = apply_overrides(cfg, overrides or []).validate()
    classes = folder.classes()
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
        images = load_dataset(cfg.data, seed=cfg.seed, progress=progress)
        if list(images.classes) != list(classes):
            raise RunFolderError(f"'{data}' has classes {list(images.classes)}, the run was trained on {classes}")
        loaders = dict.fromkeys(ids, make_loader(images, np.arange(len(images)), 64, train=False))
        n_images = len(images)
    diffusion, mae = load_defense_models(folder, cfg, trained)
    return RunUnderTest(folder.path, folder, cfg, classes, loaders, n_images, own_test, folder.experts(), mae,
                        diffusion)


def load_defense_models(run: Path | RunFolder, cfg: ExperimentConfig, trained: ExperimentConfig | None = None
                        ) -> tuple[nn.Module | None, nn.Module | None]:
    """(the U-Net the defense purifies with, the MAE), or (None, None) for a run without a defense
    (disabled, or phases 1-2 not run). The U-Net is phase 4's where the run's config (`trained`, the
    one in its config.json, before any evaluation override) fine-tunes one, and made for it."""
    folder = RunFolder.of(run)
    if not (cfg.defense.enabled and folder.has_defense_models()):
        return None, None
    purifier = folder.purifier(trained or cfg)
    if purifier is None:
        raise RunFolderError(f"run folder '{folder.path}' has no phase-4 U-Net made for its config "
                             "(defense.purifier): run `medfedpure experiment` with it again to fine-tune it")
    return load_pretrained("diffusion", cfg, purifier), load_pretrained("mae", cfg, folder.checkpoint("mae"))


def defended_classifier(run: Path | RunFolder, cfg: ExperimentConfig, client: int, model: nn.Module, mae,
                        diffusion) -> DefendedClassifier:
    """Client `client`'s defended classifier as configured (`defense.detector`, `mode`, ...), with
    the threshold calibrated on its own clean validation scores and its own purifier noise seed."""
    d = cfg.defense
    calibration = RunFolder.of(run).calibration(client)
    if d.detector not in calibration:
        raise RunFolderError(f"client {client} has no calibration for the '{d.detector}' detector")
    seed = task.client_seed(cfg, client, purpose="defense")
    scores = calibration[d.detector]
    defended = DefendedClassifier(model, build_detector(d.detector, mae, diffusion, model, seed), diffusion,
                                  d, calibrate_threshold(scores, d.target_fpr), scores).eval()
    defended.generator = torch.Generator().manual_seed(seed)
    return defended


