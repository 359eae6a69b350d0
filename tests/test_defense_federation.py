"""Phases 1-2 through Flower (FedAvg of the whole MAE / U-Net), then phase 3 with the defended
evaluation on every client, on the built-in data with tiny models."""

import json
import shutil

import pytest
from safetensors.numpy import load_file

from medfedpure.workflows.training import run_federated, run_pretraining

from conftest import demo


pytestmark = pytest.mark.slow


def tiny_config():
    cfg = demo()
    cfg.data.num_clients = 2
    cfg.data.synthetic_per_class = 200
    cfg.train.rounds = 2
    cfg.attack.max_eval_per_client = 16
    for part in (cfg.defense.mae, cfg.defense.diffusion):
        part.train.rounds, part.train.local_epochs = 2, 1
    cfg.defense.eval_detectors = ["mae", "disagreement"]
    return cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("defended")
    cfg = tiny_config()
    summaries = {phase: run_pretraining(cfg, phase, out, progress=False) for phase in ("diffusion", "mae")}
    result = run_federated(tiny_config(), out, progress=False)
    return out, summaries, result


def test_federated_pretraining_writes_checkpoints_and_metrics(run_dir):
    out, summaries, _ = run_dir
    for phase in ("diffusion", "mae"):
        rows = summaries[phase]["rows"]
        assert [r["round"] for r in rows] == [1, 2]
        assert rows[-1]["test_loss"] < rows[0]["train_loss"]  # it learned something
        assert load_file(str(out / f"{phase}.safetensors"))
        assert json.loads((out / f"{phase}_metrics.json").read_text())["training"] == "federated"


def test_defended_evaluation_per_client_and_mean(run_dir):
    out, _, result = run_dir
    rows = json.loads((out / "defense.json").read_text())["rows"]
    clients = {r["client"] for r in rows}
    assert clients == {0, 1, "mean"}
    assert {(r["detector"], r["mode"]) for r in rows if r["client"] == "mean"} == {
        (d, m) for d in ("mae", "disagreement") for m in ("selective", "graded")}
    for r in rows:
        for key in ("clean_acc", "adv_acc", "bare_clean_acc", "bare_adv_acc", "auroc", "clean_purified",
                    "adv_purified", "clean_purify_ms", "adv_score_ms", "adv_classify_ms"):
            assert r[key] is not None and r[key] >= 0, key
    graded = [r for r in rows if r["mode"] == "graded"]
    assert all(r["clean_purified"] == 1.0 for r in graded)
    assert (out / "defense_examples.png").is_file() and (out / "defense.csv").is_file()
    assert result.defense and all(r["client"] == "mean" for r in result.defense)
    for i in (0, 1):
        folder = out / "clients" / f"client_0{i}"
        assert (folder / "defense.json").is_file()
        calib = load_file(str(folder / "detector_calibration.safetensors"))
        assert set(calib) == {"mae", "disagreement"} and len(calib["mae"]) > 0


def test_a_hospital_lost_in_the_defended_evaluation_is_named_and_the_means_say_over_how_many(
        run_dir, tmp_path, monkeypatch):
    out = tmp_path / "again"
    shutil.copytree(run_dir[0], out)
    monkeypatch.setenv("MEDFEDPURE_FAIL_CLIENT", "1@defense")
    run_federated(tiny_config(), out, progress=False)  # a finished run: only the defended evaluation runs
    summary = json.loads((out / "summary.json").read_text())
    assert [(f["round"], f["phase"], f["client"]) for f in summary["failures"]] == [(2, "defended evaluation", 1)]
    assert "on purpose" in summary["failures"][0]["error"]
    rows = json.loads((out / "defense.json").read_text())["rows"]
    assert {r["client"] for r in rows} == {0, "mean"}
    assert {r["hospitals"] for r in rows if r["client"] == "mean"} == {1}
    assert {r["hospitals"] for r in json.loads((run_dir[0] / "defense.json").read_text())["rows"]
            if r["client"] == "mean"} == {2}


def test_central_mode_pools_the_clients(tmp_path):
    cfg = tiny_config()
    cfg.defense.training = "central"
    summary = run_pretraining(cfg, "mae", tmp_path, progress=False)
    assert summary["training"] == "central" and len(summary["rows"]) == 2
    assert (tmp_path / "mae.safetensors").is_file()


def test_private_pretraining_clips_each_update_and_counts_its_rounds_in_the_runs_budget(tmp_path):
    """federation.dp_pretraining: each hospital's U-Net update leaves clipped (a norm of 1e-3, noise
    of a tiny multiplier: the released U-Net moved at most about that far), and phase 2's accountant
    starts where phase 1's ended: one budget over every phase."""
    import numpy as np

    from medfedpure.defense.trainer import PHASES
    from medfedpure.federation.privacy import epsilon_after
    from medfedpure.methods import task

    cfg = tiny_config()
    cfg.data.synthetic_per_class = 60
    cfg.federation.dp_noise_multiplier, cfg.federation.dp_clipping_norm = 1e-4, 1e-3
    cfg.federation.dp_pretraining = True
    for part in (cfg.defense.mae, cfg.defense.diffusion):
        part.train.rounds = 1
    task.set_seed(cfg.seed)  # as run_pretraining builds the U-Net it starts from
    initial = {k: v.numpy() for k, v in PHASES["diffusion"].build(cfg).state_dict().items()}
    spent = {phase: run_pretraining(cfg, phase, tmp_path, progress=False)["privacy"] for phase in ("diffusion", "mae")}
    released = load_file(str(tmp_path / "diffusion.safetensors"))
    moved = np.sqrt(sum(float(((released[k] - initial[k]) ** 2).sum()) for k in released
                        if np.issubdtype(released[k].dtype, np.floating)))
    assert 0 < moved <= 1.05e-3  # unclipped, one local epoch moves it by orders of magnitude more
    assert spent["diffusion"]["epsilon"] == pytest.approx(epsilon_after(1e-4, 1, 1e-5, 2))
    assert spent["mae"]["epsilon"] == pytest.approx(epsilon_after(1e-4, 2, 1e-5, 2))
    assert spent["mae"]["phases"] == {"diffusion": 1, "mae": 1}  # what this epsilon covers so far
    rows = json.loads((tmp_path / "mae_metrics.json").read_text())["rows"]
    assert rows[0]["dp"]["clipping_norm"] == 1e-3 and rows[0]["dp"]["hospitals"] == 2
