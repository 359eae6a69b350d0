"""Give every hospital its own class-folder set, cut from one pooled dataset.

On a real deployment each hospital already has its scans; to try a deployment on one machine
(`medfedpure deploy-local`) the pooled dataset is dealt out the way the simulation deals it:
`out/hospital-<i>/<class>/...`, one folder per client, holding all of that client's scans
(links to the original files, or PNGs for the built-in synthetic set). Each hospital then makes
its own train/validation/test split (`methods.task.hospital`), the same split the simulation
makes, so a deployment and a simulation of the same config see the same scans.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from medfedpure.data.datasets import DataError, ImageSet
from medfedpure.data.partition import ClientSplit
from medfedpure.storage import atomic_folder, read_json, write_json

MANIFEST = "hospitals.json"


def write_hospital_folders(data: ImageSet, splits: list[ClientSplit], out: Path, source: dict) -> Path:
    """`out/hospital-<i>/<class>/` for every client, written into a temporary folder and renamed
    into place. `source` (what the cut was made from) is kept in `out/hospitals.json`; a folder
    that already holds the same cut is reused, any other existing `out` is refused."""
    out = Path(out)
    manifest = {"source": source, "classes": list(data.classes),
                "clients": [{"client": s.client_id, "scans": int(s.n_train + s.n_val + s.n_test)} for s in splits]}
    if out.exists():
        if (out / MANIFEST).is_file() and read_json(out / MANIFEST) == manifest:
            return out
        raise DataError(f"'{out}' already exists and does not hold this cut of the data into hospitals; "
                        "remove it or choose another --out")
    with atomic_folder(out) as tmp:
        for split in splits:
            idx = np.sort(np.concatenate([split.train_idx, split.val_idx, split.test_idx]))
            _write_hospital(data, idx, tmp / f"hospital-{split.client_id}")
        write_json(tmp / MANIFEST, manifest)
    return out


def _write_hospital(data: ImageSet, idx: np.ndarray, folder: Path) -> None:
    """Links to the original files (same names, so each class keeps its order), or lossless PNGs."""
    for name in data.classes:
        (folder / name).mkdir(parents=True)
    for i in idx:
        target = folder / data.classes[data.labels[i]]
        if data.paths is None:
            Image.fromarray(data.images[i].transpose(1, 2, 0)).save(target / f"{i:06d}.png")
            continue
        original = Path(data.paths[i]).resolve()
        class_root = Path(data.source) / data.classes[data.labels[i]]
        link = target / os.path.relpath(data.paths[i], class_root)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(original)
