"""The figures a report draws: whole rounds and clients on their axes, no legend entry without bars."""

import json

import numpy as np
import pytest

from medfedpure.reporting import plots


def _captured(monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, **kw: figures.append(fig))
    return figures


def test_rounds_and_clients_are_whole_numbers_on_the_axes(monkeypatch, tmp_path):
    figures = _captured(monkeypatch)
    rows = [{"round": r, "client": c, "clean_acc": 0.5 + 0.1 * r, "adv_acc": 0.3}
            for r in (1, 2) for c in (0, 1, "mean")]
    plots.plot_convergence(rows, tmp_path / "a.png", "two rounds", "PGD")
    plots.plot_transfer({"bare": np.full((2, 2), 0.5)}, tmp_path / "t.png", "two clients")
    convergence, transfer = figures
    ticks = convergence.axes[0].get_xticks()
    assert len(ticks) and all(float(t).is_integer() for t in ticks)
    heat = transfer.axes[0]
    assert all(float(t).is_integer() for t in [*heat.get_xticks(), *heat.get_yticks()])


def test_a_series_without_values_has_no_legend_entry_and_missing_values_no_bar(monkeypatch, tmp_path):
    figures = _captured(monkeypatch)
    from medfedpure.reporting.rows import MethodRow

    rows = [MethodRow(method="FedAvg", clean=90.0, adv=10.0), MethodRow(method="Local", clean=80.0)]
    plots.plot_method_comparison(rows, tmp_path / "m.png", "no paper figures")
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ours clean", "ours PGD (paper protocol)"]
    heights = [b.get_height() for b in ax.patches]
    assert heights[:2] == [90.0, 80.0] and heights[2] == 10.0 and np.isnan(heights[3])


def test_a_mean_over_fewer_hospitals_says_which_are_missing():
    from medfedpure.workflows.report import _missing_hospitals

    summary = {"clients": [{"client": 0}, {"client": 2}],
               "failures": [{"round": 2, "phase": "train", "client": 1, "error": "Node Unavailable"}]}
    (line,) = _missing_hospitals("MedFedPure", summary, 3)
    assert "2 of 3 hospitals" in line and "client(s) 1 (client 1: Node Unavailable)" in line
    assert _missing_hospitals("FAT", {"clients": [{"client": 0}, {"client": 1}], "failures": []}, 2) == []


def test_a_hospital_lost_in_the_defended_evaluation_is_named_beside_the_defended_means():
    from medfedpure.workflows.report import _missing_hospitals

    summary = {"clients": [{"client": 0}, {"client": 1}, {"client": 2}],
               "failures": [{"round": 3, "phase": "defended evaluation", "client": 2, "error": "Node Unavailable"}]}
    (line,) = _missing_hospitals("MedFedPure", summary, 3)
    assert "defended figures are means over 2 of 3 hospitals" in line and "client 2: Node Unavailable" in line


def test_one_markdown_renderer_and_a_regenerated_block_leaves_the_rest_alone():
    import pytest

    from medfedpure.reporting.markdown import read_block, replace_block, table

    assert table(["a", "b"], [[1, None], ["x|y", 2.5]]) == "| a | b |\n|---|---|\n| 1 |  |\n| x\\|y | 2.5 |"
    doc = "intro\n<!-- t: generated, do not edit -->\nold\n<!-- /t -->\nend\n"
    new = replace_block(doc, "t", "new\nrows")
    assert new == "intro\n<!-- t: generated, do not edit -->\nnew\nrows\n<!-- /t -->\nend\n"
    assert read_block(new, "t") == "new\nrows" and read_block(doc, "other") is None
    with pytest.raises(ValueError, match="t2: generated"):
        replace_block(doc, "t2", "x")
    empty = "a\n<!-- t: generated, do not edit -->\n<!-- /t -->\nb\n"  # a block just added: its markers only
    assert read_block(empty, "t") == ""
    assert replace_block(empty, "t", "rows") == "a\n<!-- t: generated, do not edit -->\nrows\n<!-- /t -->\nb\n"


def _published(name: str, robust: float) -> dict:
    row = {"name": name, "run": "~/runs/x", "overrides": [], "note": "", "defense": None, "clean": 0.99,
           "clean_ci": [0.97, 0.998], "clean_n": 480, "robust": robust, "robust_ci": [robust - 0.03, robust + 0.02],
           "robust_n": 480, "strongest": "eot-pgd:margin", "budget": "50 x 4", "robust_majority": robust,
           "robust_worst": robust - 0.01, "per_attack": {"eot-pgd:margin": robust}, "latency_ms": 2.2}
    return {"spec": "studies/x.yaml", "attacks": ["eot-pgd:margin"], "max_per_client": None, "overrides": [],
            "rows": [row, {**row, "name": "B", "robust": 0.95, "latency_ms": None,
                           "paired": {"only_a": 3, "only_b": 9, "p_value": 0.146}}]}


EXPECTED = """\
| candidate | clean % [CI] | robust % [CI] | strongest attack | majority | worst of N | eot-pgd:margin | ms / scan | paired with the first |
|---|---|---|---|---|---|---|---|---|
| FAT | 99.0 [97.0, 99.8] | 91.0 [88.0, 93.0] | eot-pgd:margin (50 x 4) | 91.0 | 90.0 | 91.0 | 2.2 | (reference) |
| B | 99.0 [97.0, 99.8] | 95.0 [88.0, 93.0] | eot-pgd:margin (50 x 4) | 91.0 | 90.0 | 91.0 |  | 9 vs 3, p = 0.146 |"""


def test_the_documents_results_tables_are_regenerated_from_what_is_published(tmp_path):
    """`medfedpure report --docs`: a block gets its published result's table, a hand edit is caught,
    a block without a published result is one clear error; and this repository's documents are current."""
    from pathlib import Path

    import pytest

    from medfedpure.cli import main
    from medfedpure.storage import write_json
    from medfedpure.workflows.docs import regenerate_docs

    write_json(tmp_path / "docs" / "results" / "headline.json", _published("FAT", 0.91))
    block = "<!-- results/headline: generated, do not edit -->\nstale\n<!-- /results/headline -->"
    (tmp_path / "README.md").write_text(f"# x\n\n{block}\n\nafter\n")
    assert regenerate_docs(tmp_path, check=True) == ["README.md"]
    assert main(["report", "--docs", "--check", "--root", str(tmp_path)]) == 1
    assert main(["report", "--docs", "--root", str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert EXPECTED in text and text.endswith("<!-- /results/headline -->\n\nafter\n")
    assert regenerate_docs(tmp_path, check=True) == []
    (tmp_path / "README.md").write_text(text.replace("| 91.0 [88.0, 93.0] |", "| 93.0 [88.0, 93.0] |"))
    assert regenerate_docs(tmp_path, check=True) == ["README.md"]
    (tmp_path / "docs" / "results.md").write_text(block.replace("headline", "gone"))
    with pytest.raises(ValueError, match="results/gone.*docs/results/gone.json"):
        regenerate_docs(tmp_path)
    root = Path(__file__).resolve().parents[1]
    assert regenerate_docs(root, check=True) == [], "run `medfedpure report --docs`"


def test_publishing_a_comparison_writes_its_result_and_its_frontier_figure(tmp_path):
    """`compare-defenses --publish docs/results/NAME.json`: the result with run folders named from ~,
    and the frontier figure beside it; a path that is not .json is one clear error, nothing written."""
    from pathlib import Path

    import pytest
    from PIL import Image

    from medfedpure.reporting.rows import Comparison
    from medfedpure.storage import read_json
    from medfedpure.workflows.compare import publish

    published = _published("FAT", 0.91)
    published["rows"][1].update(run=str(Path.home() / "runs" / "b"), robust_ci=[0.92, 0.97])
    result = Comparison.from_dict(published)
    assert Comparison.from_dict(result.to_dict()) == result  # typed rows read back as they were saved
    written = publish(result, tmp_path / "docs" / "results" / "headline.json")
    assert [p.name for p in written] == ["headline.json", "headline.png"]
    saved = read_json(written[0])
    assert saved["rows"][1]["run"] == "~/runs/b" and "paired" not in saved["rows"][0]
    assert saved["rows"][1]["paired"] == {"against": "", "attack": "", "verdict": "first", "only_a": 3, "only_b": 9,
                                          "p_value": 0.146}
    assert Image.open(written[1]).size[0] > 300
    with pytest.raises(ValueError, match="headline.md: a .json file"):
        publish(result, tmp_path / "headline.md")
    assert not (tmp_path / "headline.md").exists() and not (tmp_path / "headline.png").exists()


def test_a_candidates_convergence_check_gets_a_column_only_where_one_is_named():
    """A candidate with `convergence:` carries its check into the table (and back from JSON); a study
    without any keeps the table it had."""
    from medfedpure.reporting.rows import Comparison, Convergence
    from medfedpure.workflows.compare import candidates_table

    plain = Comparison.from_dict(_published("FAT", 0.91))
    assert candidates_table(plain) == EXPECTED
    published = _published("FAT", 0.91)
    published["rows"][1]["convergence"] = [
        {"attack": "eot-pgd:margin", "stronger": "eot-pgd:margin@200x20", "first": 0.92, "first_ci": [0.808, 0.978],
         "stronger_first": 0.9, "stronger_first_ci": [0.78, 0.97], "lower_beyond_interval": False, "n": 50}]
    result = Comparison.from_dict(published)
    assert isinstance(result.rows[1].convergence[0], Convergence) and result.rows[0].convergence is None
    assert Comparison.from_dict(result.to_dict()) == result and "convergence" not in result.to_dict()["rows"][0]
    lines = candidates_table(result).splitlines()
    assert lines[0].endswith("| paired with the first | convergence check |")
    assert lines[2].endswith("| (reference) |  |")
    assert lines[3].endswith("| eot-pgd:margin@200x20 90.0 vs 92.0 [80.8, 97.8], 50 scans: converged |")
    lower = Convergence.from_dict({**published["rows"][1]["convergence"][0], "stronger_first": 0.7,
                                   "lower_beyond_interval": True, "n": None})
    assert lower.cell() == "eot-pgd:margin@200x20 70.0 vs 92.0 [80.8, 97.8]: NOT converged"
    paired = Convergence.from_dict({**published["rows"][1]["convergence"][0], "only_stronger": 3, "only_usual": 2,
                                    "p_value": 1.0})
    assert paired.cell() == ("eot-pgd:margin@200x20 90.0 vs 92.0 [80.8, 97.8], 50 scans (3 fooled only by it, "
                             "2 only by the usual budget, p = 1): converged")


def test_a_method_row_reads_back_what_it_saved_and_an_older_row_without_the_adaptive_column():
    from medfedpure.reporting.rows import MethodRow

    row = MethodRow(table="II", data="br35h", resolution=64, clients=10, attack="PGD-7", model="K=3 x resnet18",
                    method="MedFedPure", protocol="p", clean=98.5, adv=90.0, adaptive=88.1, adaptive_ci=[84.9, 90.9],
                    adaptive_attack="eot-pgd:margin (50 steps x 4 draws, margin), 480 scans")
    saved = row.to_dict()
    assert list(saved)[:8] == ["table", "data", "resolution", "clients", "attack", "model", "method", "protocol"]
    assert MethodRow.from_dict({**saved, "later_key": 1}) == row
    assert row.adaptive_cell() == "**88.1** [84.9, 90.9] eot-pgd:margin (50 steps x 4 draws, margin), 480 scans"
    older = {k: v for k, v in saved.items() if not k.startswith("adaptive")}
    assert MethodRow.from_dict(older).adaptive_cell() == ""


def _stub_evaluation(folder, run, firsts: dict, votes: int = 1, ids=("a", "b")):
    """An evaluation.json of `run` under the attacks of `firsts` (first-draw accuracy each), on scans `ids`."""
    from dataclasses import asdict

    from medfedpure.config import ExperimentConfig
    from medfedpure.storage import read_json, write_json

    cfg = ExperimentConfig.from_dict(read_json(run / "config.json"))
    suite = {name: {"attack": name, "n": len(ids), "first": f, "first_ci": [f - 0.1, f + 0.05], "settings": {"steps": 50},
                    "outcomes": {"first": "1" * len(ids)}} for name, f in {"clean": 1.0, **firsts}.items()}
    write_json(folder / "evaluation.json", {
        "run": str(run), "data": "each client's own test split", "max_per_client": None, "attack_config": asdict(cfg.attack),
        "defense": {"votes": votes}, "suite": suite, "scans": {"client": [0] * len(ids), "id": list(ids)},
        "headline": {"attack": min(firsts, key=firsts.get), "first": min(firsts.values()), "first_ci": [0, 1],
                     "n": len(ids)}})
    write_json(folder / "request.json", {"run": str(run.resolve()), "overrides": []})
    return folder


def test_a_candidates_evaluations_merge_under_the_specs_strongest_attack_and_only_when_alike(tmp_path):
    """`from: [A, B]`: every attack of both (a repeated one: A's), the headline recomputed over the spec's
    attacks (not each folder's own), and one clear error where the folders differ in scans or defense."""
    import pytest

    from medfedpure.config import ConfigError, ExperimentConfig
    from medfedpure.reporting.rows import CandidateRow
    from medfedpure.storage import read_json, write_json
    from medfedpure.workflows.compare import _convergence, _reuse, _row

    run = tmp_path / "run"
    write_json(run / "config.json", ExperimentConfig().to_dict())
    spec = {"attacks": ["eot-pgd", "eot-pgd:margin"], "max_per_client": None, "overrides": []}
    a = _stub_evaluation(tmp_path / "a", run, {"eot-pgd": 0.90, "eot-pgd:margin": 0.88, "bpda": 0.5})
    b = _stub_evaluation(tmp_path / "b", run, {"eot-pgd": 0.85})
    ev = _reuse({"name": "x", "run": str(run), "from": [str(a), str(b)]}, spec)
    row = _row({"name": "x", "run": str(run)}, ev)
    assert row.per_attack == {"eot-pgd": 0.90, "eot-pgd:margin": 0.88}  # A's eot-pgd; bpda is not the spec's
    assert (row.strongest, row.robust) == ("eot-pgd:margin", 0.88)
    ev = _reuse({"name": "x", "run": str(run), "from": [str(b), str(a)]}, spec)
    assert (ev["headline"]["attack"], ev["headline"]["first"]) == ("eot-pgd", 0.85)  # B's eot-pgd now
    for other in (_stub_evaluation(tmp_path / "c", run, {"eot-pgd:margin": 0.9}, votes=3),
                  _stub_evaluation(tmp_path / "d", run, {"eot-pgd:margin": 0.9}, ids=("a", "z"))):
        with pytest.raises(ConfigError, match=f"'{other}' differs from '{b}'"):
            _reuse({"name": "x", "run": str(run), "from": [str(b), str(other)]}, spec)
    # a convergence check must be of the candidate's run, defense and strongest attack
    check = _stub_evaluation(tmp_path / "check", run, {"eot-pgd": 0.9, "eot-pgd@200x20": 0.8})
    entry = {"attack": "eot-pgd", "stronger": "eot-pgd@200x20", "first": 0.9, "first_ci": [0.8, 0.95],
             "stronger_first": 0.8, "stronger_first_ci": [0.7, 0.9], "lower_beyond_interval": True, "n": 2}
    write_json(check / "evaluation.json", {**read_json(check / "evaluation.json"), "convergence": [entry]})
    candidate = {"name": "x", "run": str(run), "convergence": str(check)}
    base = CandidateRow.from_dict({**row.to_dict(), "strongest": "eot-pgd"})
    assert _convergence(candidate, base, ev)[0].lower_beyond_interval
    with pytest.raises(ConfigError, match="no convergence check of its strongest attack, eot-pgd:margin"):
        _convergence(candidate, row, ev)
    tie = CandidateRow.from_dict({**row.to_dict(), "per_attack": {"eot-pgd": 0.88, "eot-pgd:margin": 0.88}})
    assert _convergence(candidate, tie, ev)[0].attack == "eot-pgd"  # an attack level with the strongest will do
    other = _stub_evaluation(tmp_path / "other", run, {"bpda": 0.9, "bpda@200x20": 0.8})
    write_json(other / "evaluation.json", {**read_json(other / "evaluation.json"),
                                           "convergence": [{**entry, "attack": "bpda", "stronger": "bpda@200x20"}]})
    with pytest.raises(ConfigError, match=r"eot-pgd:margin \(or of eot-pgd, level with it\)"):
        _convergence({**candidate, "convergence": str(other)}, tie, ev)
    assert _convergence({**candidate, "convergence": [str(check)]}, base, ev)[0].lower_beyond_interval  # or a list
    with pytest.raises(ConfigError, match="no attack at two budgets"):  # a folder that checks nothing
        _convergence({**candidate, "convergence": [str(check), str(tmp_path / "d")]}, base, ev)
    with pytest.raises(ConfigError, match="its defense settings"):
        _convergence(candidate, base, {**ev, "defense": {"votes": 3}})
    with pytest.raises(ConfigError, match="it evaluated"):
        _convergence({**candidate, "run": str(tmp_path / "elsewhere")}, base, ev)


def test_the_worst_of_n_pairing_gets_a_column_and_names_its_attack_where_it_is_not_the_strongest():
    """A candidate scored at worst of N under another attack than its first-draw strongest names that attack,
    and its paired test at worst of N is a column (and reads back from JSON); a result published before
    the column keeps the table it had."""
    from medfedpure.reporting.rows import Comparison, PairedTest
    from medfedpure.workflows.compare import candidates_table

    published = _published("FAT", 0.91)
    published["attacks"] = ["eot-pgd:margin", "eot-pgd:ce"]
    published["rows"][1].update(worst_attack="eot-pgd:ce", robust_worst=0.85, paired_worst={
        "against": "FAT", "attack": "eot-pgd:ce", "verdict": "worst", "n": 480, "only_a": 12, "only_b": 10,
        "p_value": 0.83})
    result = Comparison.from_dict(published)
    assert isinstance(result.rows[1].paired_worst, PairedTest) and result.rows[0].paired_worst is None
    assert Comparison.from_dict(result.to_dict()) == result and "paired_worst" not in result.to_dict()["rows"][0]
    header, _, reference, row = candidates_table(result).splitlines()
    assert header.endswith("| paired with the first | paired at worst of N |")
    assert reference.endswith("| (reference) | (reference) |")
    assert "| 85.0 (eot-pgd:ce) |" in row and row.endswith("| 9 vs 3, p = 0.146 | 10 vs 12, p = 0.83 (eot-pgd:ce) |")


def _table1(made: dict[str, list[str]], run: str, commit: str, seed: int = 0, attack: str = "PGD l2",
            partition: str | None = "dirichlet") -> dict:
    """A publication of Table I rows: `made` maps each method the run made to its rows' labels; the
    other methods get the report's 'not run' row."""
    from medfedpure.methods import METHODS

    setting = {"table": "I", "data": "cifar10", "resolution": 32, "clients": 10, "attack": attack}
    rows = []
    for name, method in METHODS.items():
        for label in made.get(name, [method.label]):
            protocol = "white-box PGD" if name in made else f"not run (medfedpure experiment --methods {name})"
            rows.append({**setting, "method": label, "protocol": protocol, "clean": 80.0 if name in made else None})
    return {"kind": "methods", "run": run, "table": "I", "rows": rows, "note": None, "missing_hospitals": [],
            "training_time_by_method": {n: {"s": 60.0 * len(n)} for n in made},
            "rounds_by_method": {n: 20 for n in made}, "seed": seed, "git_commit": commit, "git_dirty": False,
            "split": None if partition is None else {"dataset": "cifar10", "partition": partition}}


def test_a_method_made_by_another_run_is_added_to_the_published_rows_and_each_run_is_named(tmp_path, monkeypatch):
    """`report --run RUN --publish FILE --add`: the methods RUN made replace theirs, every other method keeps
    the rows FILE holds; the table names each run and its methods; another setting or seed is one error."""
    from medfedpure.workflows.report import added_to, methods_markdown

    ours = ["MoE, no defense (ours)", "MedFedPure (graded, disagreement detector)"]
    first = _table1({"medfedpure": ours, "fedavg": ["FedAvg"]}, "~/runs/table1", "a" * 40, partition=None)  # older
    second = _table1({"pfeddef": ["pFedDef"]}, "~/runs/table1-pfeddef", "b" * 40)
    path = tmp_path / "cifar10-table1.json"
    merged = added_to(first, second, path)
    made = [r["method"] for r in merged["rows"] if r["clean"] is not None]
    assert made == [*ours, "FedAvg", "pFedDef"] and len(merged["rows"]) == len(first["rows"])
    assert list(merged["training_time_by_method"]) == ["medfedpure", "fedavg", "pfeddef"]
    assert merged["rounds_by_method"] == {"medfedpure": 20, "fedavg": 20, "pfeddef": 20}
    assert [s["methods"] for s in merged["sources"]] == [["medfedpure", "fedavg"], ["pfeddef"]]
    shown = methods_markdown(merged)
    assert ("Rows from 2 runs of the same preset and seed: ~/runs/table1 at git commit aaaaaaa: medfedpure, fedavg; "
            "~/runs/table1-pfeddef at git commit bbbbbbb: pfeddef.") in shown
    assert "Rows from" not in methods_markdown(first)
    third = _table1({"fedavg": ["FedAvg"]}, "~/runs/fedavg-again", "c" * 40)  # a method made again replaces its row
    again = added_to(merged, third, path)
    assert [s["methods"] for s in again["sources"]] == [["medfedpure"], ["pfeddef"], ["fedavg"]]
    assert again["training_time_by_method"]["fedavg"] == third["training_time_by_method"]["fedavg"]
    for other, field in [(_table1({"pfeddef": ["pFedDef"]}, "~/x", "d", seed=1), "seed"),
                         (_table1({"pfeddef": ["pFedDef"]}, "~/x", "d", attack="PGD linf"), "attack")]:
        with pytest.raises(ValueError, match=f"{path}.*{field}"):
            added_to(first, other, path)
    iid = _table1({"local": ["Local"]}, "~/x", "d", partition="iid")  # a run that kept its split is checked on it
    with pytest.raises(ValueError, match=f"{path}.*data.partition dirichlet there, iid in this run"):
        added_to(merged, iid, path)
    with pytest.raises(ValueError, match="no published Table I / II rows"):
        added_to(None, second, path)
    from medfedpure.storage import write_json
    from medfedpure.workflows import report

    drawn = []  # the published figure draws the merged rows, not only the added run's
    monkeypatch.setattr(report, "plot_method_comparison", lambda rows, *a: drawn.append([r.method for r in rows]))
    write_json(path, first)
    report.publish_tables(second, path, add=True)
    assert json.loads(path.read_text())["rows"] == merged["rows"] and drawn == [[r["method"] for r in merged["rows"]]]
