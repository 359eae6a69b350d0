"""How often an exported model's out-of-domain check fires, per folder of scans.

    python benchmarks/domain.py --model MODEL_DIR --scans NAME=DIR [NAME=DIR ...] [--per-folder 200]
                                [--synthetic N] [--out benchmarks/domain.json]

Each folder's scans (at most `--per-folder`, spread evenly over the sorted list) go through
`medfedpure predict`'s Predictor; the JSON has, per folder, how many were read, how many were
out of the hospital's domain (by reason: mean intensity, spread, color, size, channels) and how many the
detector flagged. A folder of the hospital's own kind of scans should rarely be out of domain;
a foreign set (CIFAR-10 photos, synthetic scans) should mostly be. `--synthetic N` adds N of the
built-in synthetic scans (`make_synthetic`, seed 7, at the model's image size) as the folder
`synthetic`, written as PNGs to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from PIL import Image

from medfedpure.data import DataError
from medfedpure.data.datasets import make_synthetic
from medfedpure.data.scans import list_scans
from medfedpure.serving.predict import Predictor
from medfedpure.storage import write_json


REASONS = ("mean intensity", "intensity spread", "color", "size")  # else: channels (out_of_domain's wording)


def measure(model: Path, folders: dict[str, Path], per_folder: int) -> dict:
    predictor = Predictor(model, stability_draws=0)  # the domain check does not depend on the draws
    out = {"model": str(model), "model_id": predictor.bundle.model_id, "domain": predictor.bundle.manifest["domain"],
           "folders": {}}
    for name, folder in folders.items():
        files = list_scans([folder])
        step = max(1, len(files) // per_folder)
        chosen = files[::step][:per_folder]
        read, outside, flagged, reasons = 0, 0, 0, {}
        for path in chosen:
            try:
                report = predictor.predict_file(path, str(path)).report
            except DataError:
                continue
            read += 1
            flagged += report["flagged"]
            outside += bool(report["out_of_domain"])
            for reason in report["out_of_domain"]:
                key = next((k for k in REASONS if reason.startswith(k)), "channels")
                reasons[key] = reasons.get(key, 0) + 1
        out["folders"][name] = {"folder": str(folder), "scans": read, "out_of_domain": outside,
                                "out_of_domain_share": round(outside / read, 4) if read else None,
                                "by_reason": reasons, "flagged": flagged}
    return out


def write_synthetic(folder: Path, count: int, model: Path) -> Path:
    """`count` built-in synthetic scans (half with a lesion) at the model's image size, as PNGs."""
    size = int(json.loads((model / "manifest.json").read_text())["image_size"])
    scans = make_synthetic((count + 1) // 2, size, seed=7)
    for i, image in enumerate(scans.images[:count]):
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"synthetic-{i:04d}.png")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="folder written by `medfedpure export`")
    parser.add_argument("--scans", required=True, nargs="+", help="NAME=DIR: a folder of scans to check")
    parser.add_argument("--per-folder", type=int, default=200)
    parser.add_argument("--synthetic", type=int, default=0, help="also N built-in synthetic scans (0: none)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/domain.json"))
    args = parser.parse_args(argv)
    folders = {}
    for item in args.scans:
        name, sep, folder = item.partition("=")
        if not sep or not Path(folder).is_dir():
            parser.error(f"--scans wants NAME=DIR with an existing folder, not '{item}'")
        folders[name] = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic > 0:
            folders["synthetic"] = write_synthetic(Path(tmp), args.synthetic, args.model)
        result = measure(args.model, folders, args.per_folder)
    write_json(args.out, result)
    print(json.dumps(result["folders"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
