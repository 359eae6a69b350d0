"""Test accuracy against training minutes on this machine, for choosing the CIFAR-10 backbone (issue 28).

    python benchmarks/cifar_curve.py --data ../shared/data/cifar10 [--backbone resnet9] [--widths 16,32,64]
        [--epochs 10] [--batch 256] [--out benchmarks/cifar_curve.json]
    python benchmarks/cifar_curve.py --docs docs/results.md [--check] [--out benchmarks/cifar_curve.json]

The second form trains nothing: it writes the JSON's table between the `cifar-curve` markers of the
document and redraws the plot (`--check` only compares, exit 1 when the document's table is not what the
JSON gives). `--keep` adds curves to --out's (another width or schedule) instead of starting it anew.

One network per width, trained centrally on the whole training set (train/<class>/) from random init
with the fast-CIFAR recipe (David Page's ResNet-9 and Keller Jordan's airbench): SGD with Nesterov
momentum, a linear warm-up then linear decay of the learning rate over the run, label smoothing 0.2,
weight decay, random flips and translations of up to 2 pixels (reflected: the federation's
`data.augmentation=cifar`), and channels-last layout. After every epoch: the wall minutes of
training so far (evaluation not counted) and the accuracy on the whole test set (test/<class>/),
with its 95% interval. Writes the JSON and a
plot beside it (the curve). A federation of 10 hospitals sees the same images per round as one epoch
here, so a width's minutes per epoch bound its rounds in the issue's 60 minutes per method.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from medfedpure.data.datasets import load_class_folders
from medfedpure.data.loaders import train_augmentation
from medfedpure.metrics import clopper_pearson
from medfedpure.models.backbones import build_backbone
from medfedpure.reporting.markdown import read_block, replace_block, table, with_interval
from medfedpure.storage import atomic_write_text, read_json, write_json

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def normalised(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() / 255.0) - MEAN) / STD


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> int:
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch):
        x = normalised(images[i:i + batch]).contiguous(memory_format=torch.channels_last)
        correct += int((model(x).argmax(1) == labels[i:i + batch]).sum())
    return correct


def train_curve(backbone: str, width: int, train: tuple, test: tuple, epochs: int, batch: int, lr: float,
                seed: int = 0, progress: bool = True) -> dict:
    torch.manual_seed(seed)  # the model's init and the augmentation's draws
    gen = torch.Generator().manual_seed(seed)
    augment = train_augmentation("cifar", tuple(train[0].shape[-2:]))
    features, dim = build_backbone(backbone, width=width)
    model = nn.Sequential(features, nn.Linear(dim, 10)).to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": rest, "weight_decay": 0.0}],
                          lr=lr, momentum=0.9, nesterov=True)
    x_train, y_train = train
    if len(y_train) < batch:
        raise ValueError(f"{len(y_train)} training images: fewer than one batch of {batch}")
    steps = epochs * (len(y_train) // batch)
    warm = max(1, steps // 5)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up over a fifth of the steps, then linear decay
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    points, trained_s = [], 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(y_train), generator=gen)
        t0 = time.perf_counter()
        bar = tqdm(range(len(y_train) // batch), desc=f"{backbone} w{width} epoch {epoch}/{epochs}",
                   disable=not progress, leave=False)
        for b in bar:
            idx = order[b * batch:(b + 1) * batch]
            x = torch.stack([augment(im) for im in x_train[idx].float() / 255.0])  # data.augmentation=cifar's
            x = ((x - MEAN) / STD).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=0.2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        trained_s += time.perf_counter() - t0
        k = accuracy(model, *test)
        lo, hi = clopper_pearson(k, len(test[1]))
        points.append({"epoch": epoch, "minutes": trained_s / 60, "test_acc": k / len(test[1]),
                       "test_acc_ci": [lo, hi], "train_loss_last_batch": loss.item()})
        print(f"{backbone} width {width} epoch {epoch}: {trained_s / 60:.1f} min, test {100 * k / len(test[1]):.2f}%",
              flush=True)
    return {"backbone": backbone, "width": width, "parameters": sum(p.numel() for p in model.parameters()),
            "epochs": epochs, "batch": batch, "lr": lr, "points": points}


def _tensors(folder: Path, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_class_folders(folder, 32, progress=progress)
    return torch.from_numpy(np.ascontiguousarray(data.images)), torch.from_numpy(data.labels)


def _name(run: dict) -> str:
    return f"{run['backbone']} width {run['width']}, {run['epochs']} epochs"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in result["runs"]:
        xs = [p["minutes"] for p in run["points"]]
        ys = [100 * p["test_acc"] for p in run["points"]]
        ax.plot(xs, ys, marker="o", label=f"{_name(run)} ({run['parameters'] / 1e6:.1f}M)")
    ax.axhline(85, color="grey", linestyle=":", label="85% (issue 28)")
    ax.set_xlabel(f"training minutes on {result['cpus']} CPU cores")
    ax.set_ylabel(f"test accuracy % ({result['n_test']} scans)")
    ax.set_title("CIFAR-10, trained centrally from random init")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TARGET = 0.85  # issue 28's clean accuracy


def render(result: dict) -> str:
    """The curve as a table: each width's size, minutes per epoch, accuracy half-way and at the end (95%
    Clopper-Pearson interval over the test set), and the first epoch that reached the target."""
    rows = []
    for run in result["runs"]:
        points = run["points"]
        if not points:
            continue
        mid, last = points[(len(points) - 1) // 2], points[-1]
        reached = next((p for p in points if p["test_acc"] >= TARGET), None)
        rows.append([_name(run), f"{run['parameters'] / 1e6:.2f}M",
                     f"{last['minutes'] / len(points):.2f}",
                     f"{with_interval(mid['test_acc'], mid['test_acc_ci'])} (epoch {mid['epoch']}, "
                     f"{mid['minutes']:.1f} min)",
                     f"{with_interval(last['test_acc'], last['test_acc_ci'])} (epoch {last['epoch']}, "
                     f"{last['minutes']:.1f} min)",
                     f"epoch {reached['epoch']}, {reached['minutes']:.1f} min" if reached else "not reached"])
    if not rows:
        raise ValueError("the curve has no measured epoch: nothing to report")
    header = ["network", "parameters", "min / epoch", f"test % [95% CI], half-way ({result['n_test']} images)",
              "test % [95% CI], last epoch", f"first epoch at {100 * TARGET:.0f}%"]
    return table(header, rows)


def docs(out: Path, document: Path, check: bool) -> int:
    """Writes (or with `check` compares) the table of the curve at `out` into `document`, and redraws the
    plot beside `out`; 2 with one line naming the file when either cannot be read or has no place for it."""
    for path, what in ((out, "no curve to report (run the benchmark with --data first)"),
                       (document, "no such document")):
        if not path.is_file():
            print(f"{path}: {what}", file=sys.stderr)
            return 2
    result = read_json(out)
    try:
        block = render(result)
    except ValueError as err:
        print(f"{out}: {err}", file=sys.stderr)
        return 2
    try:
        text = replace_block(document.read_text(), "cifar-curve", block)
    except ValueError as err:
        print(f"{document}: {err}", file=sys.stderr)
        return 2
    if check:
        if read_block(document.read_text(), "cifar-curve") != block:
            print(f"{document}: the cifar-curve table is not what {out} gives; run "
                  f"`python benchmarks/cifar_curve.py --docs {document} --out {out}`", file=sys.stderr)
            return 1
        return 0
    atomic_write_text(document, text)
    plot(result, out.with_suffix(".png"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="CIFAR-10 as train/<class>/ and test/<class>/ images")
    parser.add_argument("--backbone", default="resnet9")
    parser.add_argument("--widths", default="16,32,64")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/cifar_curve.json"))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--docs", type=Path, help="write the table of --out's curve into this document instead")
    parser.add_argument("--check", action="store_true", help="with --docs: compare only")
    parser.add_argument("--keep", action="store_true",
                        help="keep --out's curves of other widths or schedules (measured on the same images) and add these")
    args = parser.parse_args(argv)
    if args.docs:
        return docs(args.out, args.docs, args.check)
    if args.data is None:
        parser.error("--data is required (or --docs to report a measured curve)")
    for part in ("train", "test"):
        if not (args.data / part).is_dir():
            parser.error(f"--data {args.data}: no {part}/ folder of class folders")
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        parser.error(f"--widths {args.widths}: comma-separated integers")
    train, test = (_tensors(args.data / part, not args.no_progress) for part in ("train", "test"))
    result = {"measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "data": str(args.data),
              "n_train": len(train[1]), "n_test": len(test[1]), "cpus": torch.get_num_threads(), "runs": []}
    if args.keep and args.out.is_file():
        kept = read_json(args.out)
        if (kept["n_train"], kept["n_test"], kept["cpus"]) != (result["n_train"], result["n_test"], result["cpus"]):
            parser.error(f"--keep: {args.out} was measured on {kept['n_train']} / {kept['n_test']} images with "
                         f"{kept['cpus']} threads, not {result['n_train']} / {result['n_test']} with {result['cpus']}")
        setting = (args.backbone, args.epochs, args.batch, args.lr)
        result["runs"] = [r for r in kept["runs"]  # a rerun replaces its own curve
                          if not (r["width"] in widths and (r["backbone"], r["epochs"], r["batch"], r["lr"]) == setting)]
    for width in widths:
        run = train_curve(args.backbone, width, train, test, args.epochs, args.batch, args.lr,
                          progress=not args.no_progress)
        result["runs"].append({"measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **run})
        write_json(args.out, result)  # after each width: a long run keeps what it measured
        plot(result, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
