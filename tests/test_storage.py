import os

import pytest
import torch

from medfedpure.storage import atomic_write_text, load_tensors, save_tensors, write_csv, write_json

from conftest import demo


def test_safetensors_round_trip_and_metadata(tmp_path):
    t = {"a": torch.arange(6.0).view(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    save_tensors(tmp_path / "x.safetensors", t, {"round": "3"})
    back = load_tensors(tmp_path / "x.safetensors")
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])


def test_corrupt_and_missing_checkpoints_are_named(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_tensors(bad)
    with pytest.raises(FileNotFoundError, match="none.safetensors"):
        load_tensors(tmp_path / "none.safetensors")


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    write_json(path, {"ok": 1})

    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "half")
    assert path.read_text().strip().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temp file left behind


def test_csv_union_of_columns(tmp_path):
    write_csv(tmp_path / "m.csv", [{"a": 1}, {"a": 2, "b": 3}])
    assert (tmp_path / "m.csv").read_text().splitlines() == ["a,b", "1,", "2,3"]


def test_a_run_folder_names_its_files_and_loads_them(tmp_path):
    """One object opens a run: named paths, loaders, and one error naming whatever is missing."""
    from medfedpure.runfolder import RunFolder, RunFolderError

    run = RunFolder(tmp_path)
    assert RunFolder.of(run) is run and RunFolder.of(str(tmp_path)) == run
    with pytest.raises(RunFolderError, match="config.json' is missing"):
        run.config()
    cfg = demo()
    write_json(run.config_file, cfg.to_dict())
    write_json(run / "partition.json", {"classes": ["no", "yes"]})
    assert run.config().to_dict() == cfg.to_dict() and run.classes() == ["no", "yes"]
    assert run.summary() == {} and run.environment() == {} and not run.has_defense_models()
    save_tensors(run.experts_file, {"w": torch.ones(2)})
    assert torch.equal(run.experts()["w"], torch.ones(2))
    with pytest.raises(RunFolderError, match="client 1's gate"):
        run.gate(1)
    save_tensors(run.client(1) / "gate.safetensors", {"g": torch.zeros(1)})
    assert run.gate(1)["g"].shape == (1,) and run.client(1).name == "client_01"
    assert run.baseline("fat").path == tmp_path / "baselines" / "fat" and run.evaluations == tmp_path / "evaluations"
    with pytest.raises(RunFolderError, match="calibration"):
        run.calibration(0)
    assert run.purifier(cfg) is None  # no U-Net yet
    save_tensors(run.checkpoint("diffusion"), {"u": torch.ones(1)})
    assert run.purifier(cfg) == run.checkpoint("diffusion")
