"""The benchmark command runs (on the demo's small sizes) and writes the fields the docs quote."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.mark.slow
def test_benchmark_command_writes_its_json(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(BENCH), "--preset", "demo", "--skip-flower", "--skip-deployment",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["preset"] == "demo" and result["training"]["images_per_s"] > 0
    inference = result["inference"]
    assert inference["bare_ms_per_scan"] > 0
    assert inference["defended_flagged_ms_per_scan"] > inference["defended_clean_unflagged_ms_per_scan"] > 0
    assert result["peak_rss_mb"] > 0 and "deployment" not in result
    shipped = result["shipped_default"]
    assert shipped["detector"] == "disagreement" and shipped["mode"] == "selective"  # the demo's
    for layout in ("default", "channels_last"):
        assert shipped[layout]["clean"]["over_bare"] > 1 and shipped[layout]["defended_gradient_ms_per_scan"] > 0
        stages = result["defended_gradient"][layout]
        assert 0 < stages["detector_forward_ms"] and 0 < stages["attack_gradient_ms_per_scan"]
    by_batch = result["defended_gradient"]["channels_last"]["eot4_step_ms_per_scan_and_draw_by_batch"]
    assert set(by_batch) == {"8", "16", "32", "64"} and all(v > 0 for v in by_batch.values())
    breakdown = result["experiment_breakdown"]
    assert breakdown["scans"].startswith("synthetic") and breakdown["phase_diffusion"]["projected_s"] > 0
    projected = breakdown["projected"]
    assert len(projected) == 4 and all(p["experiment_s"] > p["phase3_s"] > 0 for p in projected.values())
    layout = result["training_layout"]
    assert len(layout["default_s"]) == len(layout["channels_last_s"]) == 2 and layout["ratio"] > 0
    assert set(result["measured"]) >= {"training", "inference", "shipped_default", "defended_gradient",
                                       "experiment_breakdown", "training_layout"}
    # --only runs the named sections and keeps the others' figures
    done = subprocess.run([sys.executable, str(BENCH), "--preset", "demo", "--only", "training", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    again = json.loads(out.read_text())
    assert again["inference"] == inference and again["measured"]["training"] >= result["measured"]["training"]
    # a candidate configuration (overrides) is measured, and never mixed into another configuration's file
    done = subprocess.run([sys.executable, str(BENCH), "--preset", "demo", "--only", "training", "--out", str(out),
                           "train.batch_size=8"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "another --out" in done.stderr
    candidate = tmp_path / "candidate.json"
    done = subprocess.run([sys.executable, str(BENCH), "--preset", "demo", "--only", "training", "--out",
                           str(candidate), "train.batch_size=8"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(candidate.read_text())["overrides"] == ["train.batch_size=8"]
    assert json.loads(out.read_text()) == again  # untouched


def test_the_readme_benchmark_table_is_what_the_benchmarks_json_gives(tmp_path):
    root = BENCH.parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "readme.py"), "--check"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr  # README.md's table regenerated from benchmarks/*.json
    readme = tmp_path / "README.md"  # a hand-edited figure is caught, and the command puts it back
    text = (root / "README.md").read_text()
    readme.write_text(text.replace("| 54.0 images/s |", "| 99.0 images/s |"))
    args = ["--readme", str(readme), "--results", str(root / "benchmarks" / "results.json"),
            "--load", str(root / "benchmarks" / "load.json")]
    check = subprocess.run([sys.executable, str(root / "benchmarks" / "readme.py"), "--check", *args],
                           capture_output=True, text=True, timeout=120)
    if "54.0 images/s" in text:
        assert check.returncode == 1 and "benchmarks/readme.py" in check.stderr
    assert subprocess.run([sys.executable, str(root / "benchmarks" / "readme.py"), *args], timeout=120).returncode == 0
    assert readme.read_text() == text


@pytest.mark.slow
def test_secure_aggregation_benchmark_gives_the_plain_mean_up_to_quantization(tmp_path):
    """SecAgg+ (Flower's legacy workflow) on arrays of the experts' shapes, beside plain FedAvg: the
    securely aggregated mean is the plain one up to its quantization, and the plain one is numpy's."""
    out = tmp_path / "secagg.json"
    done = subprocess.run([sys.executable, str(BENCH.parent / "secagg.py"), "--preset", "demo", "--clients", "3",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["hospitals"] == 3 and result["values_per_hospital"] > 100_000
    assert result["max_abs_error_vs_plain_mean"] < 1e-4 and result["plain_mean_vs_numpy_mean"] < 1e-6
    assert result["secagg_plus_s"] > 0 and result["plain_fedavg_s"] > 0


def test_cifar_curve_trains_each_width_and_writes_its_points(tmp_path):
    """The accuracy-vs-minutes benchmark on a tiny CIFAR-like folder: one run per width, a point per
    epoch with minutes and an interval, the plot beside the JSON, a longer schedule added with --keep; a
    folder without test/ is refused; the document's table is made from the JSON."""
    from conftest import write_images

    for part, n in (("train", 6), ("test", 2)):
        for k, name in enumerate(("cat", "dog", "ship")):
            write_images(tmp_path / "c" / part / name, n, size=(32, 32), seed=10 * k + n)
    out = tmp_path / "curve.json"
    script = BENCH.parent / "cifar_curve.py"
    done = subprocess.run([sys.executable, str(script), "--data", str(tmp_path / "c"), "--widths", "8,16",
                           "--epochs", "2", "--batch", "8", "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["width"] for r in result["runs"]] == [8, 16] and result["n_test"] == 6
    for run in result["runs"]:
        assert [p["epoch"] for p in run["points"]] == [1, 2]
        assert all(p["minutes"] > 0 and p["test_acc_ci"][0] <= p["test_acc"] <= p["test_acc_ci"][1]
                   for p in run["points"])
    assert out.with_suffix(".png").is_file()
    more = subprocess.run([sys.executable, str(script), "--data", str(tmp_path / "c"), "--widths", "8",  # a longer run
                           "--epochs", "3", "--batch", "8", "--out", str(out), "--no-progress", "--keep"],
                          capture_output=True, text=True, timeout=600)
    assert more.returncode == 0, more.stderr[-2000:]
    assert [(r["width"], r["epochs"]) for r in json.loads(out.read_text())["runs"]] == [(8, 2), (16, 2), (8, 3)]
    bad = subprocess.run([sys.executable, str(script), "--data", str(tmp_path / "c" / "train")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no train/ folder" in bad.stderr
    # the document's table is made from the JSON, and a hand-edited figure is caught
    doc = tmp_path / "results.md"
    doc.write_text("# r\n<!-- cifar-curve: generated, do not edit -->\n<!-- /cifar-curve -->\nafter\n")
    report = lambda *extra: subprocess.run([sys.executable, str(script), "--docs", str(doc), "--out", str(out),  # noqa: E731
                                            *extra], capture_output=True, text=True, timeout=120)
    assert report().returncode == 0 and report("--check").returncode == 0
    text = doc.read_text()
    assert "| resnet9 width 8, 2 epochs |" in text and "| resnet9 width 16, 2 epochs |" in text and text.endswith("after\n")
    assert "| resnet9 width 8, 3 epochs |" in text
    last = result["runs"][1]["points"][-1]
    assert f"{100 * last['test_acc']:.1f} [" in text
    doc.write_text(text.replace("| resnet9 width 16, 2 epochs |", "| resnet9 width 99, 2 epochs |"))
    stale = report("--check")
    assert stale.returncode == 1 and "cifar-curve table is not what" in stale.stderr
    doc.write_text("# no markers\n")
    unmarked = report()
    assert unmarked.returncode == 2 and str(doc) in unmarked.stderr and doc.read_text() == "# no markers\n"


def test_the_results_cifar_curve_table_is_what_the_curve_json_gives():
    root = BENCH.parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "cifar_curve.py"), "--docs",
                           str(root / "docs" / "results.md"), "--out", str(root / "benchmarks" / "cifar_curve.json"),
                           "--check"], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
