"""`experiment` end to end on the built-in data: all phases, tables, resume after a kill, `report`."""

import json

import pytest
import torch

from medfedpure.cli import main
from medfedpure.config import load_preset
from medfedpure.evaluation.attack_suite import with_strongest
from medfedpure.runfolder import ResumeError, RunFolderError
from medfedpure.workflows import training
from medfedpure.workflows.evaluate import evaluate_run
from medfedpure.workflows.experiment import run_experiment
from medfedpure.workflows.report import ReportError, write_report

from conftest import tiny_experiment as tiny


pytestmark = pytest.mark.slow


def _snapshot(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.is_file() and p.suffix in {".json", ".csv", ".md", ".safetensors"}}


def _write_scans(folder, seed=99):
    """Scans no client saw, as class folders of PNGs."""
    from PIL import Image

    from medfedpure.data import make_synthetic

    data = make_synthetic(12, 32, seed=seed)
    for i, (img, label) in enumerate(zip(data.images, data.labels)):
        target = folder / data.classes[label]
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.transpose(1, 2, 0)).save(target / f"scan{i}.png")
    return folder


@pytest.fixture(scope="module")
def trained(copy_of_tiny_experiment):
    """The tiny experiment (every phase, the defended evaluation, the suite, the tables; conftest),
    this module's copy, shared by the end-to-end tests below; a test that damages the run works on a
    copy of its own."""
    run = copy_of_tiny_experiment
    return run, json.loads((run / "tables.json").read_text())


def test_experiment_writes_the_tables_and_a_rerun_changes_nothing(trained):
    run, tables = trained
    assert tables["table"] == "II"
    methods = [r["method"] for r in tables["rows"]]
    assert methods[0].startswith("MoE, no defense") and methods[1].startswith("MedFedPure")
    assert all(r["paper_clean"] is None for r in tables["rows"])  # the paper has no built-in-data row
    suite = json.loads((run / "evaluations" / "own-test-suite" / "evaluation.json").read_text())
    assert tables["rows"][1]["adaptive"] == round(100 * suite["headline"]["first"], 2)  # the defended headline
    assert suite["suite"]["eot-pgd:margin"]["settings"]["loss"] == "margin"  # both losses, the lower one heads
    adaptive = ("eot-pgd", "eot-pgd:margin", "square")
    assert suite["headline"]["first"] == min(suite["suite"][a]["first"] for a in adaptive)
    assert tables["rows"][0]["adaptive"] is None and "Attack suite: MedFedPure" in (run / "tables.md").read_text()
    # the training's seconds apart from the defended evaluation's, and the phases before it
    times = tables["training_time_by_method"]["medfedpure"]
    assert {"s", "diffusion", "mae", "defended evaluation"} <= set(times) and "untimed" not in times
    summary = json.loads((run / "summary.json").read_text())["final"]
    assert 0 < times["s"] == summary["training_s"] and summary["training_s"] + times["defended evaluation"] <= (
        summary["wall_time_s"] + 0.2)
    for name in ("tables.md", "tables.csv", "tables.json", "detection.csv", "accuracy_per_round.png",
                 "timings.json", "config.json", "environment.json"):
        assert (run / name).is_file(), name
    transfer = json.loads((run / "transfer.json").read_text())
    for kind in ("bare", "defended"):  # internal evasion through the defense, with the unattacked floor
        assert len(transfer[kind]["matrix"]) == len(transfer[kind]["clean_matrix"]) == 2
    assert [r["method"] for r in tables["transfer"]] == ["MedFedPure", "MedFedPure + defense"]
    assert all(r["clean_off_diagonal"] is not None for r in tables["transfer"])
    made_in = tables["run"].encode()  # the tables name the folder: this is a copy of conftest's shared run
    before = {name: data.replace(made_in, str(run).encode()) for name, data in _snapshot(run).items()}
    run_experiment(tiny(), run, progress=False)  # every phase is done: nothing is redone, not even the suite
    assert _snapshot(run) == before
    (run / "tables.md").unlink()
    (run / "tables.json").unlink()
    write_report(run)
    assert _snapshot(run) == before
    changed = tiny()
    changed.defense.mode = "graded"  # evaluation only: no retraining, but the suite follows it
    run_experiment(changed, run, progress=False)
    after = _snapshot(run)
    assert after["global_experts.safetensors"] == before["global_experts.safetensors"]
    suite = json.loads((run / "evaluations" / "own-test-suite" / "evaluation.json").read_text())
    assert suite["defense"]["mode"] == "graded"


def test_a_trained_run_evaluates_on_scans_no_client_saw_and_on_its_own_splits(trained, tmp_path, capsys):
    run, _ = trained
    # evaluate the trained federation on scans no client saw
    scans = _write_scans(tmp_path / "unseen")
    result = evaluate_run(run, scans)
    means = [r for r in result["rows"] if r["client"] == "mean"]
    assert len(means) == 4 and all(r["n_test"] == 2 * 24 for r in means)  # 2 clients x 24 scans
    assert (run / "evaluations" / "unseen" / "evaluation.md").is_file()
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--data", str(scans), "--client", "1", "--no-progress",
                 "--out", str(tmp_path / "e1"), "attack.eps=0.05"]) == 0
    assert "evaluating clients" not in capsys.readouterr().err  # --no-progress: no bar
    one = json.loads((tmp_path / "e1" / "evaluation.json").read_text())
    assert {r["client"] for r in one["rows"]} == {1, "mean"} and one["attack"]["eps"] == 0.05

    # each client on its own test split, with a stronger attack: the same scans and models as the run's end
    own = evaluate_run(run, None, overrides=["attack.steps=2"])
    final = {c["client"]: c for c in json.loads((run / "summary.json").read_text())["clients"]}
    for r in (r for r in own["rows"] if r["client"] != "mean"):
        assert r["n_test"] == final[r["client"]]["n_test"]
        assert r["bare_clean_acc"] == pytest.approx(final[r["client"]]["clean_acc"])
    assert own["attack"]["steps"] == 2 and (run / "evaluations" / "own-test" / "evaluation.md").is_file()
    with pytest.raises(ValueError, match="data.image_size"):
        evaluate_run(run, None, overrides=["data.image_size=16"])


def test_the_attack_suite_its_convergence_check_and_its_resume_through_the_cli(trained, capsys):
    run, _ = trained
    final = {c["client"]: c for c in json.loads((run / "summary.json").read_text())["clients"]}
    # the attack suite through the CLI, on 3 scans per client, with a tiny budget
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--own-test", "--attack", "all", "--max-per-client", "3",
                 "--no-progress", "attack.adaptive_steps=2", "attack.eot=2", "attack.square_queries=4",
                 "attack.draws=3"]) == 0
    printed = capsys.readouterr().out
    suite_dir = run / "evaluations" / "own-test-suite"
    suite = json.loads((suite_dir / "evaluation.json").read_text())
    assert list(suite["suite"]) == ["clean", "clean (whole split)", "pgd", "eot-pgd", "apgd", "fixed-noise", "bpda",
                                    "detector-aware", "orthogonal", "square"]
    assert suite["suite"]["fixed-noise"]["draws"] == 1 and suite["suite"]["fixed-noise"]["settings"]["eot"] == 1
    assert all(p["n"] == 6 for name, p in suite["suite"].items() if name != "clean (whole split)")
    assert suite["suite"]["clean (whole split)"]["n"] == sum(c["n_test"] for c in final.values())
    assert suite["suite"]["eot-pgd"]["settings"]["steps"] == 2 and suite["suite"]["eot-pgd"]["draws"] == 3
    assert suite["headline"]["attack"] in ("eot-pgd", "bpda", "detector-aware", "orthogonal", "square")
    assert (suite_dir / "robustness.png").is_file() and "Headline" in printed
    assert main(["evaluate", "--run", str(run), "--own-test", "--attack", "cw"]) == 2
    assert "unknown attack" in capsys.readouterr().err
    # the convergence check: the same attack at a stronger budget on the same scans, compared in the report
    checked = run / "evaluations" / "convergence"
    assert main(["evaluate", "--run", str(run), "--own-test", "--attack", "eot-pgd,eot-pgd@3x3",
                 "--max-per-client", "1", "--no-progress", "--out", str(checked), "attack.adaptive_steps=2",
                 "attack.eot=2", "attack.draws=2"]) == 0
    conv = json.loads((checked / "evaluation.json").read_text())
    assert conv["suite"]["eot-pgd@3x3"]["settings"]["steps"] == 3 and conv["suite"]["eot-pgd@3x3"]["settings"]["eot"] == 3
    (c,) = conv["convergence"]
    assert (c["attack"], c["stronger"]) == ("eot-pgd", "eot-pgd@3x3")
    assert c["lower_beyond_interval"] == (c["stronger_first"] < c["first_ci"][0])
    usual, stronger = (conv["suite"][a]["outcomes"]["first"] for a in ("eot-pgd", "eot-pgd@3x3"))  # scan by scan
    assert c["only_stronger"] == sum(u == "1" and v == "0" for u, v in zip(usual, stronger)) and c["n"] == len(usual)
    assert c["only_usual"] == sum(u == "0" and v == "1" for u, v in zip(usual, stronger)) and 0 < c["p_value"] <= 1
    assert conv["headline"]["first"] == min(conv["suite"][a]["first"] for a in ("eot-pgd", "eot-pgd@3x3"))
    report = (checked / "evaluation.md").read_text()
    assert "Convergence: eot-pgd@3x3" in report and "| majority [CI] | worst of N [CI] |" in report
    # an interrupted evaluation resumes hospital by hospital: a finished hospital is not attacked again
    stamp = (checked / "clients" / "0.json").stat().st_mtime_ns
    for name in ("request.json", "evaluation.json", "clients/1.json"):  # stopped while attacking hospital 1
        (checked / name).unlink()
    assert main(["evaluate", "--run", str(run), "--own-test", "--attack", "eot-pgd,eot-pgd@3x3",
                 "--max-per-client", "1", "--no-progress", "--out", str(checked), "attack.adaptive_steps=2",
                 "attack.eot=2", "attack.draws=2"]) == 0
    resumed = json.loads((checked / "evaluation.json").read_text())
    assert (checked / "clients" / "0.json").stat().st_mtime_ns == stamp and (checked / "clients" / "1.json").is_file()
    assert resumed["suite"]["eot-pgd@3x3"]["outcomes"] == conv["suite"]["eot-pgd@3x3"]["outcomes"]
    assert resumed["scans"] == conv["scans"]
    # a longer list of attacks resumes from the shorter one's results, which it keeps as they were
    assert main(["evaluate", "--run", str(run), "--own-test", "--attack", "eot-pgd,eot-pgd@3x3,bpda",
                 "--max-per-client", "1", "--no-progress", "--out", str(checked), "attack.adaptive_steps=2",
                 "attack.eot=2", "attack.draws=2"]) == 0
    longer = json.loads((checked / "evaluation.json").read_text())
    assert list(longer["suite"]) == [*resumed["suite"], "bpda"] and longer["suite"]["bpda"]["n"] == len(usual)
    for name, kept in resumed["suite"].items():  # the same seconds too: not attacked again
        assert {k: longer["suite"][name][k] for k in kept} == kept
    # what `experiment`'s headline runs: its attacks and the suite's strongest after them, once
    strongest = longer["headline"]["attack"]
    assert with_strongest(["square"], checked) == ["square", strongest]
    assert with_strongest([strongest, "square"], checked) == [strongest, "square"]
    assert with_strongest(["square"], checked / "none") == ["square"]


def test_defense_candidates_are_compared_on_the_same_scans(trained, tmp_path, capsys):
    run, _ = trained
    suite_dir = tmp_path / "suite"  # an evaluation that stands in for a candidate (`from:`)
    assert main(["evaluate", "--run", str(run), "--own-test", "--attack", "eot-pgd", "--max-per-client", "3",
                 "--no-progress", "--out", str(suite_dir), "attack.adaptive_steps=2", "attack.eot=2",
                 "attack.square_queries=4", "attack.draws=3"]) == 0
    suite = json.loads((suite_dir / "evaluation.json").read_text())
    # defense candidates under the same attacks on the same scans; a rerun redoes nothing; the suite
    # above stands in for a candidate because it ran the same attack on the same scans with the same budget
    spec = tmp_path / "candidates.yaml"
    budget = "[attack.adaptive_steps=2, attack.eot=2, attack.square_queries=4, attack.draws=3]"
    spec.write_text(f"attacks: [eot-pgd]\nmax_per_client: 3\noverrides: {budget}\ncandidates:\n"
                    f"  - {{name: as trained, run: {run}}}\n"
                    f"  - {{name: selective votes 3, run: {run}, overrides: [defense.mode=selective, "
                    f"defense.votes=3]}}\n"
                    f"  - {{name: the suite above, run: {run}, from: {suite_dir}}}\n")
    frontier = tmp_path / "frontier"
    assert main(["compare-defenses", str(spec), "--out", str(frontier), "--no-progress"]) == 0
    table = json.loads((frontier / "candidates.json").read_text())
    assert [r["name"] for r in table["rows"]] == ["as trained", "selective votes 3", "the suite above"]
    assert table["rows"][1]["defense"]["votes"] == 3 and table["rows"][1]["robust_n"] == 6
    assert table["rows"][2]["robust"] == suite["suite"]["eot-pgd"]["first"]
    # paired with the first candidate on the same scans (McNemar): counts that agree with the accuracies
    assert "paired" not in table["rows"][0]
    for row in table["rows"][1:]:
        p = row["paired"]
        assert p["against"] == "as trained" and p["attack"] == row["strongest"] and p["n"] == 6
        assert p["b_correct"] - p["a_correct"] == p["only_b"] - p["only_a"] and 0 <= p["p_value"] <= 1
        assert p["b_correct"] == round(row["per_attack"][p["attack"]] * 6)
        w = row["paired_worst"]  # resubmission: the same test on the worst of the N answers
        assert (w["verdict"], w["attack"], w["n"]) == ("worst", row["worst_attack"], 6)
        assert w["b_correct"] == round(row["robust_worst"] * 6) and w["b_correct"] <= p["b_correct"]
    assert "paired_worst" not in table["rows"][0] and table["rows"][0]["worst_attack"] == "eot-pgd"
    assert len(suite["scans"]["id"]) == 6 and len(suite["suite"]["eot-pgd"]["outcomes"]["worst"]) == 6
    assert "McNemar" in (frontier / "candidates.md").read_text()
    assert (frontier / "candidates.png").is_file() and not (frontier / "the-suite-above").exists()
    stamp = (frontier / "as-trained" / "evaluation.json").stat().st_mtime_ns
    assert main(["compare-defenses", str(spec), "--out", str(frontier), "--no-progress"]) == 0
    assert (frontier / "as-trained" / "evaluation.json").stat().st_mtime_ns == stamp
    # a convergence check (the strongest attack at a larger budget beside the usual one, on the same scans)
    checked = tmp_path / "convergence"
    assert main(["evaluate", "--run", str(run), "--own-test", "--attack", "eot-pgd,eot-pgd@4x3", "--max-per-client",
                 "1", "--no-progress", "--out", str(checked), "attack.adaptive_steps=2", "attack.eot=2",
                 "attack.draws=3"]) == 0
    (c,) = json.loads((checked / "evaluation.json").read_text())["convergence"]
    assert (c["attack"], c["stronger"], c["n"]) == ("eot-pgd", "eot-pgd@4x3", 2)
    first = spec.read_text().splitlines()
    spec.write_text("\n".join(first[:4] + [f"  - {{name: as trained, run: {run}, convergence: {checked}}}"]
                              + first[5:]) + "\n")
    assert main(["compare-defenses", str(spec), "--out", str(frontier), "--no-progress"]) == 0
    rows = json.loads((frontier / "candidates.json").read_text())["rows"]
    assert rows[0]["convergence"] == [c] and "convergence" not in rows[1]
    assert "eot-pgd@4x3" in (frontier / "candidates.md").read_text()
    assert (frontier / "as-trained" / "evaluation.json").stat().st_mtime_ns == stamp  # nothing redone
    spec.write_text(spec.read_text().replace(f"convergence: {checked}", f"convergence: [{checked}]"))  # or a list
    assert main(["compare-defenses", str(spec), "--out", str(frontier), "--no-progress"]) == 0
    assert json.loads((frontier / "candidates.json").read_text())["rows"][0]["convergence"] == [c]
    spec.write_text(spec.read_text().replace(str(checked), str(suite_dir)))
    assert main(["compare-defenses", str(spec), "--out", str(frontier)]) == 2
    assert "no convergence check" in capsys.readouterr().err  # one budget only
    # a candidate's attacks may come from several evaluations of the same scans (e.g. one per loss)
    margin = tmp_path / "margin"
    assert main(["evaluate", "--run", str(run), "--own-test", "--attack", "eot-pgd:margin", "--max-per-client", "3",
                 "--no-progress", "--out", str(margin), "attack.adaptive_steps=2", "attack.eot=2",
                 "attack.square_queries=4", "attack.draws=3"]) == 0
    both = tmp_path / "both.yaml"
    both.write_text(f"attacks: [eot-pgd, eot-pgd:margin]\nmax_per_client: 3\noverrides: {budget}\ncandidates:\n"
                    f"  - {{name: one, run: {run}, from: [{suite_dir}, {margin}]}}\n"
                    f"  - {{name: two, run: {run}, from: [{margin}, {suite_dir}]}}\n")
    assert main(["compare-defenses", str(both), "--out", str(tmp_path / "both"), "--no-progress"]) == 0
    one, two = json.loads((tmp_path / "both" / "candidates.json").read_text())["rows"]
    margin_first = json.loads((margin / "evaluation.json").read_text())["suite"]["eot-pgd:margin"]["first"]
    assert one["per_attack"] == two["per_attack"] == {"eot-pgd": suite["suite"]["eot-pgd"]["first"],
                                                      "eot-pgd:margin": margin_first}
    assert one["robust"] == min(one["per_attack"].values()) and two["paired"]["p_value"] == 1.0
    both.write_text(both.read_text().replace(f"[{margin}, {suite_dir}]", f"[{margin}]"))
    assert main(["compare-defenses", str(both), "--out", str(tmp_path / "both")]) == 2
    assert "did not run ['eot-pgd']" in capsys.readouterr().err
    spec.write_text(spec.read_text().replace(f", convergence: {suite_dir}", "").replace("attack.eot=2", "attack.eot=3"))
    assert main(["compare-defenses", str(spec), "--out", str(frontier)]) == 2
    assert "not comparable" in capsys.readouterr().err  # the stand-in ran another budget
    spec.write_text("candidates:\n  - {name: x, run: /nonexistent}\n")
    assert main(["compare-defenses", str(spec), "--out", str(frontier)]) == 2
    assert "/nonexistent" in capsys.readouterr().err


def test_a_corrupted_checkpoint_and_a_missing_file_are_named(trained, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained[0], run)
    scans = _write_scans(tmp_path / "unseen")
    gate = run / "clients" / "client_00" / "gate.safetensors"
    gate.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="gate.safetensors"):
        evaluate_run(run, scans)
    (run / "global_experts.safetensors").unlink()
    with pytest.raises(RunFolderError, match="global_experts.safetensors"):
        evaluate_run(run, scans)


def test_resume_refuses_another_config(trained):
    run, _ = trained
    other = tiny()
    other.train.lr = 0.5
    with pytest.raises(ResumeError, match="another config"):
        training.run_federated(other, run, progress=False)


def test_report_needs_results(tmp_path):
    with pytest.raises(ReportError, match="summary.json"):
        write_report(tmp_path)


def test_table_rows_put_the_papers_numbers_beside_ours(tmp_path):
    """A Br35H run folder (results written by hand here) gets the paper's Table II row."""
    from medfedpure.workflows.report import _markdown, build_tables

    cfg = load_preset("br35h-cpu")
    cfg.data.root = "/data/br35h"
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "environment.json").write_text(json.dumps({"git_commit": "abc", "packages": {}}))
    mean = {"detector": "disagreement", "mode": "graded", "rule": "threshold", "auroc": 0.99, "tpr_at_tau": 0.9,
            "fpr_at_tau": 0.05, "clean_acc": 0.98, "adv_acc": 0.9, "clean_purified": 1.0, "adv_purified": 1.0,
            "adv_mean_t": 100.0, "adv_score_ms": 1.0, "adv_purify_ms": 2.0, "adv_classify_ms": 3.0}
    (tmp_path / "summary.json").write_text(json.dumps(
        {"final": {"clean_acc": 0.99, "adv_acc": 0.1, "wall_time_s": 10.0}, "defense": [mean]}))
    fat = tmp_path / "baselines" / "fat"  # trained with its own rounds (method.rounds)
    fat.mkdir(parents=True)
    cfg.method.name, cfg.train.rounds = "fat", 4
    (fat / "config.json").write_text(json.dumps(cfg.to_dict()))
    (fat / "summary.json").write_text(json.dumps({"final": {"clean_acc": 0.97, "adv_acc": 0.8, "wall_time_s": 5.0}}))
    tables = build_tables(tmp_path)
    rows = {r["method"].split(" (")[0]: r for r in tables["rows"]}
    assert rows["MedFedPure"]["clean"] == 98.0 and rows["MedFedPure"]["paper_adv"] == 87.33
    assert rows["pFedDef"]["clean"] is None and rows["pFedDef"]["paper_clean"] == 98.33
    assert all(r["resolution"] == 64 and "eps=0.015" in r["attack"] for r in tables["rows"])
    said = "Training wall time (s) per method, over every session that worked on it: medfedpure 10.0 (10 rounds; "
    untimed = "timed before the training was counted apart: the wall time of the session that finished it, "
    assert said + untimed + "with its defended evaluation), fat 5.0 (4 rounds; " + untimed + "training only)" in (
        _markdown(tables))  # runs made before the training's seconds were kept apart from the evaluation's
    (tmp_path / "summary.json").write_text(json.dumps(  # one whose evaluation ran apart (after phase 4)
        {"final": {"clean_acc": 0.99, "adv_acc": 0.1, "wall_time_s": 10.0, "reevaluation_s": 2.0}, "defense": [mean]}))
    assert said + untimed + "training only; its defended evaluation 2.0)" in _markdown(build_tables(tmp_path))
    (tmp_path / "summary.json").write_text(json.dumps(
        {"final": {"clean_acc": 0.99, "adv_acc": 0.1, "wall_time_s": 10.0, "training_s": 7.0,
                   "defended_evaluation_s": 3.0}, "defense": [mean], "purifier": "abc"}))
    (tmp_path / "diffusion_metrics.json").write_text(json.dumps({"wall_time_s": 4.0, "training_s": 4.5}))
    (tmp_path / "mae_metrics.json").write_text(json.dumps({"wall_time_s": 1.0, "training_s": None}))  # an older checkpoint's
    (tmp_path / "purifier_metrics.json").write_text(json.dumps({"wall_time_s": 2.5, "training_s": 2.0}))
    assert ("medfedpure 7.0 (10 rounds; before them U-Net 4.5, MAE 1.0; after them fine-tuned U-Net 2.0; its defended "
            "evaluation 3.0), fat 5.0" in _markdown(build_tables(tmp_path)))


def test_environment_records_uncommitted_changes(tmp_path):
    """A run made from an edited tree says so: its commit alone would not reproduce it."""
    import subprocess

    from medfedpure.reporting.results import git_commit, git_dirty

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "preset.yaml").write_text("lr: 0.001\n")
    git("add", "preset.yaml")
    git("commit", "-q", "-m", "preset")
    assert len(git_commit(tmp_path)) == 40 and git_dirty(tmp_path) is False
    (tmp_path / "scratch.txt").write_text("untracked files do not count\n")
    assert git_dirty(tmp_path) is False
    (tmp_path / "preset.yaml").write_text("lr: 0.0001\n")
    assert git_dirty(tmp_path) is True
    assert git_commit(tmp_path / "missing") is None and git_dirty(tmp_path / "missing") is None


def test_phase_4_fine_tunes_the_purifier_and_the_defense_then_uses_it(tiny_experiment_run, tmp_path_factory):
    """defense.purifier.rounds > 0: after phase 3 the U-Net is fine-tuned against the hospitals'
    classifiers (FedAvg), the defended evaluation runs with it, a rerun redoes nothing, and every
    later evaluation purifies with it. Phase 3's fingerprint ignores phase 4, so adding phase 4 to a
    finished run does not retrain it."""
    import shutil

    from medfedpure.evaluation.runs import open_run
    from medfedpure.methods import fingerprint
    from medfedpure.runfolder import PURIFIER
    from medfedpure.storage import load_tensors

    tmp_path = tmp_path_factory.mktemp("phase4") / "run"
    shutil.copytree(tiny_experiment_run, tmp_path)  # phases 1-3 done, evaluated with phase 1's U-Net
    cfg = tiny()
    cfg.defense.eval_detectors, cfg.defense.eval_modes = ["disagreement"], ["graded"]  # a cheaper evaluation
    cfg.defense.purifier.adv_attack = "n-fgsm"  # a cheap attack to fine-tune against: a test
    without = fingerprint(cfg, "train")
    before = json.loads((tmp_path / "summary.json").read_text())
    experts = load_tensors(tmp_path / "global_experts.safetensors")
    assert before["purifier"] is None and "defense" in before and not (tmp_path / PURIFIER).exists()
    cfg.defense.purifier.rounds, cfg.defense.purifier.lr = 2, 1e-3
    assert fingerprint(cfg, "train") == without and fingerprint(cfg, "purifier") != without
    run_experiment(cfg, tmp_path, progress=False, transfer=False, suite=False)  # phase 4 added to the finished run
    again = load_tensors(tmp_path / "global_experts.safetensors")
    assert all(torch.equal(experts[k], again[k]) for k in experts)  # phase 3 not retrained
    tuned, phase1 = load_tensors(tmp_path / PURIFIER), load_tensors(tmp_path / "diffusion.safetensors")
    assert tuned.keys() == phase1.keys() and any(not torch.equal(tuned[k], phase1[k]) for k in tuned)
    rows = json.loads((tmp_path / "purifier_metrics.json").read_text())["rows"]
    assert [r["round"] for r in rows] == [1, 2]
    assert all({"train_loss", "test_loss", "train_adv_acc", "test_adv_acc", "test_clean_acc"} <= set(r) for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["purifier"] == fingerprint(cfg, "purifier") and "defense" in summary
    # the run's wall time stays its training's; the evaluation run again is recorded beside it
    assert summary["final"]["wall_time_s"] == before["final"]["wall_time_s"] and summary["final"]["reevaluation_s"] > 0
    assert json.loads((tmp_path / "config.json").read_text())["defense"]["purifier"]["rounds"] == 2
    # the evaluation it replaced is kept, byte for byte: nothing already written is lost
    (earlier,) = (tmp_path / "earlier").iterdir()
    assert json.loads((earlier / "summary.json").read_text()) == before
    assert json.loads((earlier / "config.json").read_text())["defense"]["purifier"]["rounds"] == 0
    assert (earlier / "defense.json").is_file() and (earlier / "environment.json").is_file()
    # a rerun redoes nothing; an evaluation of the run purifies with phase 4's U-Net
    stamp = (tmp_path / "summary.json").stat().st_mtime_ns
    run_experiment(cfg, tmp_path, progress=False, transfer=False, suite=False)
    assert (tmp_path / "summary.json").stat().st_mtime_ns == stamp and len(list((tmp_path / "earlier").iterdir())) == 1
    r = open_run(tmp_path, None)
    assert all(torch.equal(v, tuned[k]) for k, v in r.diffusion.state_dict().items())


def test_which_u_net_is_current_follows_the_config(tmp_path):
    """Phase 3 is done with the defended evaluation made with phase 1's U-Net when the config has no
    phase 4, phase 4 only with its own (this config's) U-Net and evaluation; a phase-4 U-Net made
    for other settings is never used."""
    import copy

    from medfedpure.methods import METHODS, fingerprint
    from medfedpure.runfolder import CHECKPOINTS, PURIFIER, purifier_weights
    from medfedpure.storage import save_tensors
    from medfedpure.workflows.experiment import phase_done

    cfg = METHODS["medfedpure"].configure(tiny())
    tuned = copy.deepcopy(cfg)
    tuned.defense.purifier.rounds = 2
    other = copy.deepcopy(tuned)
    other.defense.purifier.lr = 1e-2
    summary = {"fingerprint": fingerprint(cfg, "train"), "defense": [{}], "purifier": None}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert phase_done(cfg, tmp_path, "train") and phase_done(tuned, tmp_path, "train")
    assert not phase_done(tuned, tmp_path, "purifier")
    save_tensors(tmp_path / CHECKPOINTS["diffusion"], {"w": torch.zeros(1)}, {})
    save_tensors(tmp_path / PURIFIER, {"w": torch.ones(1)}, {"fingerprint": fingerprint(tuned, "purifier")})
    assert purifier_weights(tmp_path, cfg) == tmp_path / CHECKPOINTS["diffusion"]
    assert purifier_weights(tmp_path, tuned) == tmp_path / PURIFIER
    assert purifier_weights(tmp_path, other) is None  # stale: made with other phase-4 settings
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "purifier": fingerprint(tuned, "purifier")}))
    assert phase_done(tuned, tmp_path, "purifier") and not phase_done(other, tmp_path, "purifier")
    assert not phase_done(cfg, tmp_path, "train")  # phase 4 turned off: evaluate again with phase 1's U-Net
    # an attack-suite evaluation made before phase 4 is stale once the run purifies with phase 4's U-Net
    from medfedpure.evaluation.attack_suite import current_purifier

    before = tmp_path / "evaluations" / "own-test-suite"
    before.mkdir(parents=True)
    (before / "request.json").write_text(json.dumps({"attacks": ["eot-pgd"]}))
    assert not current_purifier(before, tmp_path)
    (before / "request.json").write_text(json.dumps({"purifier": fingerprint(tuned, "purifier")}))
    assert current_purifier(before, tmp_path)


def test_a_runs_rows_are_published_and_the_documents_render_them_as_the_report_does(trained, tmp_path, capsys):
    """`report --run RUN --publish docs/results/NAME.json`: the rows (no per-scan outcomes) and the
    methods figure; `report --docs` puts the same table as tables.md's in the block 'results/NAME'."""
    from medfedpure.workflows.docs import regenerate_docs

    run, tables = trained
    target = tmp_path / "docs" / "results" / "tiny.json"
    assert main(["report", "--run", str(run), "--publish", str(tmp_path / "tiny.md")]) == 2
    assert "a .json file" in capsys.readouterr().err and not (tmp_path / "tiny.md").exists()
    assert main(["report", "--run", str(run), "--publish", str(target)]) == 0
    kept = json.loads(target.read_text())
    assert kept["kind"] == "methods" and kept["rows"] == tables["rows"] and "suites" not in kept
    assert target.with_suffix(".png").is_file()
    block = "<!-- results/tiny: generated, do not edit -->\n<!-- /results/tiny -->"
    (tmp_path / "README.md").write_text(f"# x\n\n{block}\n")
    assert regenerate_docs(tmp_path) == ["README.md"]
    shown = (tmp_path / "README.md").read_text().split("-->\n", 1)[1].rsplit("\n<!--", 1)[0]
    assert shown.splitlines()[0].startswith("| data | px | model |") and shown in (run / "tables.md").read_text()
    assert "Training wall time (s) per method, over every session that worked on it: medfedpure" in shown
    assert main(["report", "--docs", "--publish", str(target)]) == 2
    assert main(["report", "--run", str(run), "--add"]) == 2 and "--add goes with --publish" in capsys.readouterr().err
    assert main(["report", "--run", str(run), "--publish", str(tmp_path / "none.json"), "--add"]) == 2
    assert "nothing is published at" in capsys.readouterr().err and not (tmp_path / "none.json").exists()
    assert main(["report", "--run", str(run), "--publish", str(target), "--add"]) == 0  # the same run again
    again = json.loads(target.read_text())
    assert again["rows"] == kept["rows"]
    assert [s["methods"] for s in again["sources"]] == [list(tables["training_time_by_method"])]


def test_a_hospitals_saved_results_resume_in_a_moved_run_and_a_longer_list(tmp_path):
    """What `evaluate_suite` resumes from, hospital by hospital: the same request (its run moved or
    copied elsewhere), or the same with fewer attacks; never another budget or an unrelated list."""
    from medfedpure.evaluation.attack_suite import _finished_client, suite_request
    from medfedpure.storage import read_json, write_json

    run = tmp_path / "moved"
    (run / "evaluations" / "own-test-headline").mkdir(parents=True)
    out = run / "evaluations" / "own-test-headline"
    asked = suite_request(run, None, ["eot-pgd", "apgd:margin"], max_per_client=5)
    made = {**asked, "run": "/where/it/was/made", "attacks": ["eot-pgd"]}
    tally = {"n": 5, "first": 2, "majority": 2, "worst": 1}
    write_json(out / "clients" / "3.json", {"request": made, "client": 3, "scan_ids": ["a"] * 5,
                                             "results": {"clean": {"tally": tally}, "eot-pgd": {"tally": tally}}})
    done = _finished_client(out, 3, asked)
    assert done is not None and set(done["results"]) == {"clean", "eot-pgd"} and done["results"]["eot-pgd"]["tally"].worst == 1
    assert _finished_client(out, 4, asked) is None  # nothing saved for that hospital
    assert _finished_client(out, 3, {**asked, "attacks": ["apgd:margin", "eot-pgd"]}) is None  # not a prefix
    assert _finished_client(out, 3, {**asked, "max_per_client": 6}) is None  # other scans
    assert _finished_client(tmp_path, 3, asked) is None
    outside = tmp_path / "elsewhere"  # outside the run, another run's results are not this one's
    write_json(outside / "clients" / "3.json", read_json(out / "clients" / "3.json"))
    assert _finished_client(outside, 3, asked) is None and _finished_client(outside, 3, made) is not None
