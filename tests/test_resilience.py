"""A hospital that fails mid-run: the federation goes on without it when enough others answer,
says who failed and why, and stops with one clear line (keeping its last finished round) when
too few answer."""

import pytest

from medfedpure.cli import loopback_only_unavailable, main
from medfedpure.storage import read_json

pytestmark = pytest.mark.slow

TINY = ["data.synthetic_per_class=90", "train.rounds=3", "train.local_epochs=1", "attack.max_eval_per_client=4",
        "defense.enabled=false"]


def test_one_failing_hospital_of_three_is_left_out_of_its_round(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDFEDPURE_FAIL_CLIENT", "1@2")
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--no-progress", *TINY]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "round 2: client 1 failed (train)" in printed and "on purpose" in printed
    assert "Traceback" not in captured.err
    summary = read_json(out / "summary.json")
    assert [(f["round"], f["phase"], f["client"]) for f in summary["failures"]] == [(2, "train", 1)]
    rows = read_json(out / "metrics.json")["rows"]
    assert sorted(r["client"] for r in rows if r["round"] == 2 and r["client"] != "mean" and r["n_train"]) == [0, 2]
    assert {r["client"] for r in rows if r["round"] == 3} == {0, 1, 2, "mean"}  # it is back in round 3
    assert summary["final"]["round"] == 3
    # the undefended run evaluated on its own test splits: per client, and the test-size-weighted mean
    # of the run's end; no cap, every test scan attacked
    from medfedpure.workflows.evaluate import evaluate_run

    mean = evaluate_run(out, None)["rows"][-1]
    assert mean["client"] == "mean" and mean["n_test"] == summary["final"]["n_test"]
    assert mean["clean_acc"] == pytest.approx(summary["final"]["clean_acc"])
    assert mean["n_adv"] == mean["n_test"]


def test_too_few_answers_stop_the_run_with_one_line_and_keep_the_last_round(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDFEDPURE_FAIL_CLIENT", "0@2,1@2")
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--no-progress", *TINY, "data.num_clients=2"]) == 2
    err = capsys.readouterr().err
    assert "training round 2: only 0 of 2 clients answered, 1 needed" in err and "on purpose" in err
    assert "Traceback" not in err and len(err.splitlines()) < 10, err  # no Ray traceback, a line per failure
    assert read_json(out / "checkpoints" / "train.json")["round"] == 1
    first_session = read_json(out / "checkpoints" / "train.json")["state"]["training_s"]
    monkeypatch.delenv("MEDFEDPURE_FAIL_CLIENT")
    assert main(["train", "--out", str(out), "--no-progress", *TINY, "data.num_clients=2"]) == 0  # resumes
    final = read_json(out / "summary.json")["final"]
    # both sessions' training counted: the first's, and nearly all of the second's wall time (no defense to evaluate)
    assert final["round"] == 3 and final["training_s"] >= first_session + 0.5 * final["wall_time_s"] and first_session > 0


def test_a_training_clock_counts_every_session_and_knows_when_it_cannot():
    from types import SimpleNamespace

    from medfedpure.workflows.training import TrainingClock

    assert TrainingClock().round_end() >= 0 and TrainingClock().trained == 0.0
    assert TrainingClock(SimpleNamespace(state={"training_s": 100.0})).round_end() >= 100.0
    older = TrainingClock(SimpleNamespace(state={"history": {}}))  # a checkpoint from before the clock
    assert older.trained is None and older.round_end() is None and older.since_last_round() >= 0


# ---------------------------------------------------------------- kill -9 at five points, then the same command
KILL_POINTS = {  # what the folder shows when the process is killed
    "phase 1 (diffusion), after its round": lambda out: (out / "checkpoints" / "diffusion.json").is_file(),
    "phase 2 (MAE), after its round": lambda out: (out / "checkpoints" / "mae.json").is_file(),
    "phase 3, in the middle of round 2": lambda out: _train_round(out) == 1 and _history_rounds(out) >= 2,
    "the defended evaluation": lambda out: _train_round(out) == 2 and not (out / "summary.json").is_file(),
    "the attack suite and the tables": lambda out: (out / "summary.json").is_file()
    and not (out / "tables.md").is_file(),
}


def _train_round(out):
    path = out / "checkpoints" / "train.json"
    try:
        return read_json(path)["round"] if path.is_file() else 0
    except ValueError:  # caught mid-write
        return 0


def _history_rounds(out):
    path = out / "clients" / "client_00" / "history.json"
    try:
        return max((h["round"] for h in read_json(path)), default=0) if path.is_file() else 0
    except ValueError:
        return 0


def _experiment(out, preset):
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "medfedpure.cli", "experiment", "--preset", str(preset), "--out", str(out),
            "--no-progress", "--no-transfer"]
    return subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=os.environ)


def _kill_when(proc, out, point, timeout=600):
    """SIGKILL the command and everything it started (its Ray processes) once `point` holds."""
    import os
    import signal
    import time

    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if KILL_POINTS[point](out):
                return True
            if proc.poll() is not None:
                return False  # finished before the point was seen
            time.sleep(0.05)
        raise AssertionError(f"never reached: {point}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _results(out):
    """Every accuracy and detection figure of the tables (not the timings)."""
    tables = read_json(out / "tables.json")
    rows = [{k: r[k] for k in ("method", "clean", "adv", "adaptive")} for r in tables["rows"]]
    detection = [{k: v for k, v in r.items() if not k.endswith("_ms")} for r in tables["detection"]]
    return rows, detection


def test_kill_9_at_five_points_then_the_same_command_gives_the_same_tables(tiny_experiment_run, tmp_path):
    """`experiment` killed (SIGKILL, with its Ray processes) at five points, then run again: the same
    tables as the run never killed (conftest's tiny experiment, the same config, run once in-process)."""
    import yaml

    from conftest import tiny_experiment

    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump(tiny_experiment().to_dict()))
    straight, killed = tiny_experiment_run, tmp_path / "killed"
    reached = []
    for point in KILL_POINTS:
        if _kill_when(_experiment(killed, preset), killed, point):
            reached.append(point)
    assert len(reached) >= 4, reached  # the last point is a narrow window on a fast machine
    proc = _experiment(killed, preset)
    assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]
    def config(run):  # less where this machine caches decoded images (each pytest worker has its own)
        saved = read_json(run / "config.json")
        saved["data"].pop("cache_dir")
        return saved

    assert config(killed) == config(straight)
    assert _results(killed) == _results(straight)
    # round by round too: every client's metrics, and each hospital's history holds each round once
    # (phase 3 was killed with round 2 half done: the hospital had recorded it, the server had not)
    rows, again = (read_json(out / "metrics.json")["rows"] for out in (straight, killed))
    assert len(rows) == len(again)
    for a, b in zip(rows, again):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == (pytest.approx(b[key], rel=1e-4, abs=1e-6) if isinstance(a[key], float) else b[key]), key
    for i in range(2):
        history = read_json(killed / "clients" / f"client_{i:02d}" / "history.json")
        assert [h["round"] for h in history if h["phase"] == "train"] == [1, 2], i


def test_loopback_only_runs_the_federation_where_loopback_is_the_only_interface(tmp_path, capfd):
    """Ray listens on every interface; --loopback-only runs the command in a network namespace of its
    own, where loopback is the only interface there is (issue 13, item 9)."""
    problem = loopback_only_unavailable()
    if problem:
        pytest.skip(f"this machine allows no network namespace of one's own: {problem}")
    out = tmp_path / "run"
    one_round = [a for a in TINY if not a.startswith("train.rounds")] + ["train.rounds=1"]
    assert main(["--loopback-only", "train", "--out", str(out), "--no-progress", *one_round]) == 0
    captured = capfd.readouterr()
    assert "network: a namespace of its own, interfaces lo\n" in captured.out + captured.err
    assert read_json(out / "summary.json")["final"]["round"] == 1
