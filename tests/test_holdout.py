"""`holdout`: export the scans a run never used; `evaluate` accepts the class folders it writes."""

import json
from pathlib import Path

import pytest

from conftest import demo, write_images
from medfedpure.cli import main
from medfedpure.config import DataConfig, ExperimentConfig
from medfedpure.data import CIFAR10_CLASSES, DataError, load_cifar10, load_dataset
from medfedpure.data.datasets import cap_per_class
from medfedpure.data.holdout import export_holdout
from medfedpure.evaluation.runs import dataset_for_folder
from medfedpure.workflows.training import prepare_run


def folder_set(root, per_class=(10, 8)):
    """Class folders of small PNGs: `per_class[i]` images in class i."""
    for i, n in enumerate(per_class):
        write_images(root / f"class{i}", n, size=(12, 12), seed=i, fmt="PNG")
    return root


def tiny_run(run, data, dataset="folder", max_per_class=5, num_clients=2):
    """A run folder holding only what `holdout` reads: config.json and partition.json."""
    cfg = demo()
    cfg.data = DataConfig(dataset=dataset, root=str(data), image_size=8, num_clients=num_clients,
                          max_per_class=max_per_class, min_client_size=1, test_fraction=0.3)
    prepare_run(cfg, run)
    return run


def used_files(run, data):
    """The files the run trained on (resolved), loaded as the run did."""
    cfg = ExperimentConfig.from_dict(json.loads((run / "config.json").read_text()))
    cfg.data.root = str(data)
    return {str(Path(p).resolve()) for p in load_dataset(cfg.data, seed=cfg.seed).paths}


def exported(out):
    """Class -> resolved source files of an export."""
    return {d.name: {str(p.resolve()) for p in d.iterdir()} for d in out.iterdir() if d.is_dir()}


def test_paths_follow_images_through_the_cap(tmp_path):
    data = folder_set(tmp_path / "set")
    full = load_dataset(DataConfig(dataset="folder", root=str(data), image_size=8))
    assert len(full.paths) == len(full) == 18 and full.paths[0].endswith("img0.png")
    capped = cap_per_class(full, 3, seed=4)
    assert len(capped.paths) == 6
    for path, label in zip(capped.paths, capped.labels):
        assert f"class{label}" in path  # still aligned with the labels
    synthetic = load_dataset(DataConfig(dataset="synthetic", synthetic_per_class=2, image_size=8))
    assert synthetic.paths is None


def test_held_out_files_are_the_complement_of_the_used_ones(tmp_path, capsys):
    data = folder_set(tmp_path / "set")
    run = tiny_run(tmp_path / "run", data)
    used = used_files(run, data)
    assert len(used) == 10  # 5 per class

    out = tmp_path / "holdout"
    record = export_holdout(run, data, out)
    files = exported(out)
    held = files["class0"] | files["class1"]
    assert len(files["class0"]) == 5 and len(files["class1"]) == 3
    assert not held & used
    assert len(held) + len(used) == 18
    assert all(p.is_symlink() for d in out.iterdir() if d.is_dir() for p in d.iterdir())
    assert record["per_class"] == {"class0": 5, "class1": 3}
    assert record["n_used_by_run"] == 10 and record["n_held_out_total"] == 8
    assert json.loads((out / "holdout.json").read_text()) == record
    # the export loads as a plain class-folder set with the run's classes
    assert load_dataset(DataConfig(dataset="folder", root=str(out), image_size=8)).classes == ("class0", "class1")

    # the CLI: one line per class and the evaluate command to run next
    assert main(["holdout", "--run", str(run), "--data", str(data), "--out", str(tmp_path / "h2"),
                 "--per-class", "2", "--copy"]) == 0
    text = capsys.readouterr().out
    assert "class0: 2" in text and "class1: 2" in text
    assert f"medfedpure evaluate --run {run} --data {tmp_path / 'h2'}" in text
    assert not any(p.is_symlink() for p in (tmp_path / "h2" / "class0").iterdir())


def test_per_class_cap_is_a_repeatable_draw(tmp_path):
    data = folder_set(tmp_path / "set", per_class=(12, 12))
    run = tiny_run(tmp_path / "run", data, max_per_class=4)
    first = export_holdout(run, data, tmp_path / "a", per_class=3)
    export_holdout(run, data, tmp_path / "b", per_class=3)
    assert first["per_class"] == {"class0": 3, "class1": 3} and first["n_held_out_total"] == 16
    assert exported(tmp_path / "a") == exported(tmp_path / "b")
    assert not (exported(tmp_path / "a")["class0"] & used_files(run, data))


def test_cifar10_split_folders_reuse_names_and_evaluate_reads_the_export(tmp_path):
    data = tmp_path / "c10"
    for split, n in (("train", 3), ("test", 2)):
        for i, name in enumerate(CIFAR10_CLASSES):
            write_images(data / split / name, n, size=(8, 8), seed=i, fmt="PNG")  # img0.png in both splits
    run = tiny_run(tmp_path / "run", data, dataset="cifar10", max_per_class=3)
    out = tmp_path / "holdout"
    record = export_holdout(run, data, out)
    assert sum(record["per_class"].values()) == 20 and record["n_used_by_run"] == 30
    names = [p.name for p in (out / "airplane").iterdir()]
    assert all(n.startswith(("train_", "test_")) for n in names) and len(set(names)) == 2
    assert load_cifar10(data, 8).paths is not None

    assert dataset_for_folder("cifar10", out) == "folder"  # plain class folders, a CIFAR-10 run
    assert dataset_for_folder("cifar10", data) == "cifar10"  # the run's own train/ test/ layout
    assert dataset_for_folder("synthetic", out) == "folder"
    assert dataset_for_folder("br35h", tmp_path / "anything") == "br35h"
    loaded = load_dataset(DataConfig(dataset=dataset_for_folder("cifar10", out), root=str(out), image_size=8))
    assert loaded.classes == CIFAR10_CLASSES and len(loaded) == 20  # sorted names keep CIFAR-10's order


def test_clear_errors(tmp_path, capsys):
    data = folder_set(tmp_path / "set")
    run = tiny_run(tmp_path / "run", data)

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "note.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        export_holdout(run, data, busy)
    with pytest.raises(DataError, match="inside the data folder"):
        export_holdout(run, data, data / "holdout")

    fewer = folder_set(tmp_path / "fewer", per_class=(10, 4))  # class1 below the run's cap of 5
    with pytest.raises(DataError, match="does not match the run"):
        export_holdout(run, fewer, tmp_path / "o1")
    other = tmp_path / "other"
    for name in ("cat", "dog"):
        write_images(other / name, 8, size=(12, 12), fmt="PNG")
    with pytest.raises(DataError, match="does not match the run.*cat"):
        export_holdout(run, other, tmp_path / "o2")

    exact = folder_set(tmp_path / "exact", per_class=(10, 5))
    with pytest.raises(DataError, match="does not match the run.*other files"):  # same counts, other files
        export_holdout(run, exact, tmp_path / "o1")
    exact_run = tiny_run(tmp_path / "exact-run", exact)  # this run used all of class1
    with pytest.raises(DataError, match="every image of class class1"):
        export_holdout(exact_run, exact, tmp_path / "o1")

    whole = tiny_run(tmp_path / "whole", data, max_per_class=None)
    with pytest.raises(DataError, match="every image in .* is used by run .*max_per_class"):
        export_holdout(whole, data, tmp_path / "o3")

    synthetic = tmp_path / "synthetic-run"
    cfg = demo()
    cfg.data.synthetic_per_class = 30  # enough for 3 clients with a validation scan each
    prepare_run(cfg, synthetic)
    with pytest.raises(DataError, match="only image-file layouts"):
        export_holdout(synthetic, data, tmp_path / "o4")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    assert main(["holdout", "--run", str(whole), "--data", str(data), "--out", str(tmp_path / "o5")]) == 2
    err = capsys.readouterr().err
    assert "every image" in err and "Traceback" not in err
