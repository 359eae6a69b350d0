"""Bad input, as a careless or hostile user gives it: each case is one clear error naming the
file or field (never a traceback, never a silent wrong figure), and nothing already written
is lost. One test per case of issue 13; the end-to-end failure cases are in test_resilience."""

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from medfedpure.cli import main
from medfedpure.config import ConfigError, load_preset
from medfedpure.data import DataError, load_dataset, make_client_splits
from medfedpure.data.datasets import decode_image, load_class_folders
from medfedpure.metrics import evaluate_accuracy
from medfedpure.storage import read_json

from conftest import demo, write_images


# ---------------------------------------------------------------- images
def test_16_bit_grayscale_keeps_its_range(tmp_path):
    ramp = np.tile(np.linspace(0, 4095, 64).round().astype(np.uint16), (64, 1))  # a 12-bit scanner ramp
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode.startswith("I")
    x = decode_image(tmp_path / "ramp.png", 64)
    assert x.dtype == np.uint8 and x.shape == (3, 64, 64)
    assert (x == 255).mean() < 0.05  # was 92% white: clipped at 255 of 4095
    row = x[0, 0].astype(float)
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row) >= 0)  # the ramp survives, monotone
    assert abs(row[32] - 128) <= 3  # 12 bits scaled by their depth, not by 16


def test_exif_orientation_is_applied_in_training_and_predict(tmp_path):
    """A JPEG stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view) is read as
    it is viewed, by the training loader and by `predict`/`serve` alike."""
    from medfedpure.data.scans import read_scan

    stored = np.zeros((40, 20, 3), np.uint8)  # 40 high, 20 wide as stored
    stored[:, :10] = 255  # left half white as stored: the top half once turned to be viewed
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    for x in (decode_image(tmp_path / "sideways.jpg", 32),
              read_scan((tmp_path / "sideways.jpg").read_bytes(), 32, name="sideways.jpg")):
        assert x[0, :12].mean() > 200 and x[0, -12:].mean() < 50  # white on top, dark below


def test_a_raw_16_bit_value_means_the_same_grey_in_every_scan(tmp_path):
    """The depth is the scanner's (12 bits unless a value exceeds 4095, else 16), not guessed from
    each scan's own maximum: raw 2000 is the same grey in a scan peaking at 2047 and at 4095."""
    greys = []
    for peak, value in ((2047, 2000), (4095, 2000), (30000, 30000)):
        arr = np.full((16, 16), value, np.uint16)
        arr[0, 0] = peak
        Image.fromarray(arr).save(tmp_path / f"p{peak}.png")
        greys.append(int(decode_image(tmp_path / f"p{peak}.png", 16)[0, 8, 8]))
    assert greys[0] == greys[1] == round(2000 / 4095 * 255)  # was 249 and 125
    assert greys[2] == round(30000 / 65535 * 255)  # a 16-bit scan: ~117, was 233


def test_decompression_bomb_is_named(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((60, 60), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 3600 pixels > 2x the limit: refused like 20000^2
    with pytest.raises(DataError, match="big.png"):
        decode_image(tmp_path / "big.png", 32)


def test_symlink_loop_in_a_class_folder_is_named(tmp_path):
    root = tmp_path / "data"
    write_images(root / "a", 3)
    write_images(root / "b", 3)
    os.symlink(root / "b" / "loop.jpg", root / "b" / "loop.jpg")  # points at itself
    with pytest.raises(DataError, match="loop.jpg"):
        load_class_folders(root, 16)


def test_a_file_name_that_is_not_utf8_is_read_like_any_other(tmp_path):
    from medfedpure.data.datasets import files_digest

    for c in ("no", "yes"):
        write_images(tmp_path / c, 3, fmt="PNG")
    try:
        os.rename(os.fsencode(tmp_path / "yes" / "img0.png"), os.fsencode(tmp_path / "yes") + b"/img\xff.png")
    except OSError:
        pytest.skip("this file system refuses a non-UTF-8 file name")
    data = load_class_folders(tmp_path, 16, cache_dir=str(tmp_path / "cache"), progress=False)
    assert len(data.images) == 6 and len(files_digest(data)) == 16


def test_a_fifo_given_to_predict_is_named_as_what_it_is(tmp_path):
    from medfedpure.data.scans import list_scans

    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(DataError, match="pipe.png' is not a regular file"):
        list_scans([tmp_path / "pipe.png"])
    with pytest.raises(DataError, match="does not exist"):
        list_scans([tmp_path / "gone.png"])


def test_images_in_sub_folders_of_a_class_are_used(tmp_path):
    root = tmp_path / "data"
    write_images(root / "a", 2)
    write_images(root / "a" / "2019", 3, seed=4)  # a class folder with a sub-folder per year
    write_images(root / "b", 2, seed=5)
    write_images(root / "b" / ".ipynb_checkpoints", 2, seed=6)  # hidden: not data
    data = load_class_folders(root, 16)
    assert np.bincount(data.labels).tolist() == [5, 2]


def _malicious_batch(path, marker):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(path, "wb") as fh:
        pickle.dump({"data": Payload(), "labels": [0]}, fh)


def test_cifar_batches_never_run_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    _malicious_batch(folder / "data_batch_1", marker)
    cfg = demo().data
    cfg.dataset, cfg.root = "cifar10", str(tmp_path)
    with pytest.raises(DataError, match="data_batch_1"):
        load_dataset(cfg)
    assert not marker.exists()


def test_cifar_batches_still_load(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({b"batch_label": b"x", b"labels": list(rng.integers(0, 10, 4)),
                         b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8),
                         b"filenames": [b"a.png"] * 4}, fh, protocol=2)
    cfg = demo().data
    cfg.dataset, cfg.root, cfg.image_size = "cifar10", str(tmp_path), 32
    assert len(load_dataset(cfg)) == 24


# ---------------------------------------------------------------- config and CLI
@pytest.mark.parametrize("override, field", [
    ("name=../../../x", "name"), ("train.batch_size=0", "train.batch_size"), ("train.lr=-0.1", "train.lr"),
    ("attack.max_eval_per_client=0", "attack.max_eval_per_client"), ("data.max_per_class=-5", "data.max_per_class"),
])
def test_bad_values_name_the_field(override, field, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), override]) == 2
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path.parent / "x").exists()


def test_negative_seed_and_a_folder_as_preset(tmp_path, capsys):
    assert main(["train", "--seed", "-1", "--out", str(tmp_path / "run")]) == 2
    assert "seed" in capsys.readouterr().err
    assert main(["train", "--preset", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "Traceback" not in err


def test_yaml_parsing_is_bounded_aliases_and_sizes(tmp_path, capsys):
    """A 'billion laughs' of nested aliases, a huge list and an oversized file are refused at once
    (bounded time and memory), by name, before anything is written."""
    import time

    from medfedpure.config import MAX_YAML_BYTES, MAX_YAML_VALUES

    laughs = ["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]" for p, c in zip("abcdefgh", "bcdefghi")]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(laughs) + "\nattack:\n  suite: *i\n")
    assert bomb.stat().st_size < 1000
    t0 = time.perf_counter()
    assert main(["train", "--preset", str(bomb), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "alias" in err and str(bomb) in err and "Traceback" not in err and time.perf_counter() - t0 < 5
    big = tmp_path / "big.yaml"
    big.write_text("attack:\n  suite: [" + ",".join(["eot-pgd"] * (MAX_YAML_BYTES // 8 + 1)) + "]\n")
    with pytest.raises(ConfigError, match="big.yaml.*bytes"):
        load_preset(str(big))
    many = "[" + ",".join(["1"] * (MAX_YAML_VALUES + 1)) + "]"
    with pytest.raises(ConfigError, match="values"):
        demo(f"attack.suite={many}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", ["attack.suite=[eot-pgd", "train.rounds=\t3", "train.rounds=*x",
                                      "train.rounds=\udcff", "train.\udcff=3"])
def test_malformed_override_values_are_one_clear_line(override, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), override]) == 2
    err = capsys.readouterr().err
    assert "override" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_folder_named_like_a_preset_file_is_named(tmp_path, capsys):
    folder = tmp_path / "mine.yaml"
    folder.mkdir()
    assert main(["train", "--preset", str(folder), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and str(folder) in err and "Traceback" not in err


@pytest.mark.parametrize("text", ["[]", "{}", '{"round": "3", "config": "x", "state": {}}', '{"round": 1}'])
def test_a_round_checkpoint_of_the_wrong_shape_is_named(text, tmp_path):
    from medfedpure.runfolder import ResumeError, load_round

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "train.json").write_text(text)
    with pytest.raises(ResumeError, match="train.json"):
        load_round(tmp_path, "train", "x")


def test_a_summary_of_the_wrong_shape_is_named(tmp_path):
    from medfedpure.runfolder import ResumeError
    from medfedpure.workflows.experiment import phase_done

    (tmp_path / "summary.json").write_text("[]")
    with pytest.raises(ResumeError, match="summary.json"):
        phase_done(demo(), tmp_path, "train")


@pytest.mark.parametrize("command", ["experiment", "train", "pretrain-mae"])
def test_a_data_refusal_leaves_no_out_folder(command, tmp_path, capsys):
    one_class = tmp_path / "scans" / "yes"
    write_images(one_class, 4)
    out = tmp_path / "new" / "run"
    assert main([command, "--out", str(out), "--no-progress", "data.dataset=folder",
                 f"data.root={one_class.parent}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(one_class.parent) in err
    assert not (tmp_path / "new").exists()  # not even the parent it would have made


def test_transfer_with_one_client_is_refused_not_nan(tmp_path):
    from medfedpure.evaluation.transfer import transfer_matrix

    cfg = demo()
    cfg.data.num_clients = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(ValueError, match="1 client"):
        transfer_matrix(tmp_path, progress=False)
    assert not (tmp_path / "transfer.json").exists()


def test_data_given_to_a_synthetic_preset_is_refused(tmp_path, capsys):
    assert main(["train", "--data", "/nonexistent", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "synthetic" in err and "data.dataset" in err


def test_bad_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        read_json(tmp_path / "config.json")


# ---------------------------------------------------------------- figures computed on nothing
def test_a_client_without_test_scans_is_refused_at_partition_time():
    labels = np.repeat([0, 1], 5)
    with pytest.raises(DataError, match="0 test"):
        make_client_splits(labels, 8, "iid", 0.5, 0.2, 0)


def test_accuracy_on_nothing_is_not_zero():
    import torch

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    loader = [(torch.rand(0, 3, 4, 4), torch.zeros(0, dtype=torch.long))]

    class Empty(list):
        dataset = []

    out = evaluate_accuracy(model, Empty(loader), attack=lambda x, y: x, max_items=None)
    assert out["clean_acc"] is None and out["adv_acc"] is None and out["n_test"] == 0


def test_preset_file_with_bad_json_config_in_a_run_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{oops")
    assert main(["evaluate", "--run", str(run), "--own-test"]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "Traceback" not in err
    assert json.loads  # the file is left as it was
    assert (run / "config.json").read_text() == "{oops"


def test_config_errors_are_config_errors():
    cfg = demo()
    cfg.name = "a/b"
    with pytest.raises(ConfigError, match="name"):
        cfg.validate()


# ---------------------------------------------------------------- run folders
@pytest.fixture(scope="module")
def finished_run(copy_of_tiny_experiment):
    """A tiny defended experiment (conftest's, this module's copy) for the run-folder cases."""
    from conftest import tiny_experiment

    return copy_of_tiny_experiment, tiny_experiment()


def test_a_refused_resume_writes_nothing(finished_run, capsys):
    out, _ = finished_run
    before = {name: (out / name).read_bytes() for name in ("config.json", "partition.json", "environment.json")}
    assert main(["train", "--out", str(out), "--seed", "5", "--no-progress", "data.num_clients=2",
                 "data.synthetic_per_class=120", "train.rounds=2"]) == 2
    assert "another config" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in before} == before


def test_a_kill_before_the_summary_is_repaired_by_the_rerun(finished_run):
    """Killed after the last round, before summary.json: the rerun must do the defended evaluation."""
    from medfedpure.workflows import experiment

    out, cfg = finished_run
    defense = read_json(out / "defense.json")
    (out / "summary.json").unlink()
    (out / "defense.json").unlink()
    experiment.run_experiment(cfg, out, progress=False, transfer=False, suite=False)

    def figures(rows):
        return [{k: v for k, v in r.items() if not k.endswith("_ms")} for r in rows]  # not the timings

    assert figures(read_json(out / "defense.json")["rows"]) == figures(defense["rows"])
    assert "defense" in read_json(out / "summary.json")


def test_client_out_of_range_and_an_edited_model_section_are_named(finished_run, capsys, tmp_path):
    out, _ = finished_run
    assert main(["evaluate", "--run", str(out), "--own-test", "--client", "7"]) == 2
    assert "client index 0-1" in capsys.readouterr().err
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    config = read_json(copy / "config.json")
    config["model"]["head_hidden"] = 128
    (copy / "config.json").write_text(json.dumps(config))
    assert main(["evaluate", "--run", str(copy), "--own-test", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "do not match its config.json" in err and "Traceback" not in err


def test_a_truncated_checkpoint_under_experiment_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "diffusion.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a")  # cut short
    assert main(["experiment", "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "diffusion.safetensors" in err and "Traceback" not in err
