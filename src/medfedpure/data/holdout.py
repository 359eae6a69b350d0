"""Export the scans a run never used (`medfedpure holdout`), to evaluate it on data no client saw.

A run may train on a subset (`data.max_per_class`, drawn with the run's seed). Loading the
folder exactly as the run did gives that subset again; every other file in the folder is
held out. They are written as `<out>/<class>/<file>` (symlinks, or copies), a plain
class-folder layout that `medfedpure evaluate` accepts for any run.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from medfedpure.config import ExperimentConfig
from medfedpure.data.datasets import DataError, files_digest, load_dataset
from medfedpure.runfolder import CONFIG, PARTITION
from medfedpure.storage import atomic_folder, read_json, write_json


def export_holdout(run: Path, data: Path, out: Path, per_class: int | None = None, copy: bool = False) -> dict:
    """Write the files in `data` that run `run` did not use to `out`; returns what holdout.json records.

    `per_class` keeps at most that many per class (a seeded, reproducible draw); `copy` copies
    the files instead of linking them, for an export that outlives the source folder.
    """
    run, data, out = Path(run), Path(data), Path(out)
    if per_class is not None and per_class < 1:
        raise DataError(f"--per-class must be at least 1 (got {per_class})")
    cfg, partition = _read_run(run)
    if cfg.data.dataset == "synthetic":
        raise DataError(f"run '{run}' trained on the built-in synthetic data: only image-file layouts "
                        f"(br35h, cifar10 train/ test/ JPEGs, class folders) can be exported")
    _check_out(out, data)
    cfg.data.root = str(data)
    if cfg.data.cache_dir and not Path(cfg.data.cache_dir).is_dir():
        cfg.data.cache_dir = None  # the run's cache is on another machine: use this one's default
    full = load_dataset(dataclasses.replace(cfg.data, max_per_class=None), seed=cfg.seed)
    used = load_dataset(cfg.data, seed=cfg.seed) if cfg.data.max_per_class else full
    if full.paths is None or used.paths is None:
        raise DataError(f"'{data}' holds CIFAR-10 batch files, not image files: only image-file layouts "
                        f"(br35h, cifar10 train/ test/ JPEGs, class folders) can be exported")
    _check_matches_run(run, data, used.classes, len(used), partition)
    if partition.get("files_sha256") and files_digest(used) != partition["files_sha256"]:
        raise DataError(f"the data folder does not match the run: '{data}' loaded as run '{run}' did gives other "
                        "files than the ones it trained on (files added, removed or renamed since?)")

    used_paths = set(used.paths)
    held = np.array([i for i, p in enumerate(full.paths) if p not in used_paths], dtype=np.int64)
    if len(held) == 0:
        raise DataError(f"every image in '{data}' ({len(full)}) is used by run '{run}'; nothing is held out. "
                        f"Train with data.max_per_class=N (below the smallest class) to keep scans aside")
    held_per_class = np.bincount(full.labels[held], minlength=len(full.classes))
    empty = [name for name, n in zip(full.classes, held_per_class) if n == 0]
    if empty:
        raise DataError(f"run '{run}' used every image of class {', '.join(empty)} in '{data}', so an evaluation "
                        f"on the rest could not score that class; train with a lower data.max_per_class")
    chosen = _pick_per_class(held, full.labels, len(full.classes), per_class, seed=cfg.seed + 1)

    files = [(full.classes[full.labels[i]], Path(full.paths[i])) for i in chosen]
    names = _unique_names(files)
    counts = Counter(name for name, _ in files)
    record = {"run": str(run.resolve()), "source": str(data.resolve()), "out": str(out.resolve()),
              "mode": "copy" if copy else "symlink",
              "per_class": {name: counts[name] for name in full.classes},
              "n_used_by_run": len(used), "n_held_out_total": int(len(held)),
              "seed": cfg.seed + 1 if per_class else None}
    _write_atomically(out, files, names, copy, record)
    return record


def _read_run(run: Path) -> tuple[ExperimentConfig, dict]:
    for name in (CONFIG, PARTITION):
        if not (run / name).is_file():
            raise DataError(f"run folder '{run}' lacks {name} (written by `medfedpure train` or `experiment`)")
    cfg = ExperimentConfig.from_dict(read_json(run / CONFIG))
    return cfg, read_json(run / PARTITION)


def _check_out(out: Path, data: Path) -> None:
    """Never mix the export with other files, and never write it into the data folder itself
    (a new sub-folder there would become a class the next time the folder is loaded)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"output folder '{out}' already exists and is not empty; choose a new folder")
    data_abs, out_abs = data.resolve(), out.resolve()
    if out_abs == data_abs or data_abs in out_abs.parents:
        raise DataError(f"output folder '{out}' lies inside the data folder '{data}'; choose one outside it")


def _check_matches_run(run: Path, data: Path, classes: tuple[str, ...], n_used: int, partition: dict) -> None:
    """The subset must be the one the run split among its clients, else the complement is wrong."""
    if list(classes) != list(partition.get("classes", classes)):
        raise DataError(f"the data folder does not match the run: '{data}' has classes {list(classes)}, "
                        f"run '{run}' was trained on {partition['classes']}")
    clients = partition.get("clients") or []
    if clients and all("n_train" in c and "n_test" in c for c in clients):
        n_run = sum(c["n_train"] + c.get("n_val", 0) + c["n_test"] for c in clients)
        if n_run != n_used:
            raise DataError(f"the data folder does not match the run: loading '{data}' the way run '{run}' did "
                            f"gives {n_used} images, but its clients held {n_run} (partition.json)")


def _pick_per_class(idx: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int | None,
                    seed: int) -> np.ndarray:
    """At most `per_class` of `idx` per class, drawn like `cap_per_class` so reruns pick the same files."""
    if per_class is None:
        return idx
    rng = np.random.default_rng(seed)
    keep = [np.sort(rng.permutation(idx[labels[idx] == c])[:per_class]) for c in range(num_classes)]
    return np.concatenate(keep)


def _unique_names(files: list[tuple[str, Path]]) -> list[str]:
    """File names inside each class folder; CIFAR's train/ and test/ reuse names, so when any
    name repeats within a class, every file is prefixed with its split folder (`train_img0.jpg`)."""
    names = [p.name for _, p in files]
    if len(set(zip((c for c, _ in files), names))) < len(files):
        names = [f"{p.parent.parent.name}_{p.name}" for _, p in files]
    if len(set(zip((c for c, _ in files), names))) < len(files):  # still clashing: number them
        names = [f"{i:06d}_{p.name}" for i, (_, p) in enumerate(files)]
    return names


def _write_atomically(out: Path, files: list[tuple[str, Path]], names: list[str], copy: bool,
                      record: dict) -> None:
    """Fill a temporary sibling folder, then rename it to `out`: a failure leaves no half export."""
    with atomic_folder(out) as tmp:  # `out` was checked empty above
        for (class_name, source), name in zip(files, names):
            target = tmp / class_name / name
            target.parent.mkdir(exist_ok=True)
            if copy:
                shutil.copy2(source.resolve(), target)
            else:
                target.symlink_to(source.resolve())
        write_json(tmp / "holdout.json", record)
