"""Tables in the paper's format (Table I / II rows), detection statistics and latencies,
rebuilt from a run folder's saved results (`medfedpure report`), never from memory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from medfedpure.attacks import pgd_label
from medfedpure.config import ExperimentConfig
from medfedpure.evaluation.attack_suite import (OWN_TEST_EVALUATIONS, budget_label, convergence_lines,
                                               current_purifier, default_suite_dir, paired_test)
from medfedpure.methods import METHODS, OURS, REFERENCE
from medfedpure.reporting.markdown import percent, table, with_interval
from medfedpure.reporting.plots import plot_convergence, plot_method_comparison
from medfedpure.reporting.published import from_home, publish_path
from medfedpure.reporting.rows import AttackResult, Headline, MethodRow, PairedTest
from medfedpure.storage import atomic_write_text, read_json, write_csv, write_json
from medfedpure.runfolder import CONFIG, ENVIRONMENT, SUMMARY

log = logging.getLogger(__name__)

# docs/design.md, Evaluation protocols: what the paper reports (clean %, adversarial %).
PAPER = {
    ("II", "br35h"): {"pFedDef": (98.33, 49.50), "MedFedPure": (97.67, 87.33)},
    ("II", "cifar10"): {"pFedDef": (68.64, 14.28), "MedFedPure": (88.11, 77.98)},
    ("I", "cifar10"): {"FedAvg": (93.0, 0.0), "Local": (38.0, 33.0), "FedEM": (76.0, 13.0), "FAT": (80.0, 30.0),
                       "Local Adv": (30.0, 28.0), "pFedDef": (66.0, 48.0), "MedFedPure": (82.31, 69.13)},
}
PHASE_WORDS = {"diffusion": "U-Net", "mae": "MAE", "train": "experts", "purifier": "fine-tuned U-Net"}
ROBUST_WORDS = {"median": "the coordinate-wise median",  # federation.aggregation, as tables.md says it
                "trimmed-mean": "the coordinate-wise mean after cutting {trim_fraction:g} of them from each tail"}
NOTES = {"I": "The paper's Table I pFedDef figures come from another protocol (cross-client evaluation, "
              "l_2 eps 4.5), not the one used here."}


# what deals the scans to the hospitals and into their splits: rows published from two runs (`report --add`)
# must agree on it, as on the seed
SPLIT_FIELDS = ("dataset", "image_size", "num_clients", "partition", "dirichlet_alpha", "min_client_size",
                "test_fraction", "val_fraction", "max_per_class", "layout", "classes")


class ReportError(FileNotFoundError):
    """A run folder without the results a report needs."""


def _load(run: Path, name: str) -> dict:
    path = run / name
    if not path.is_file():
        raise ReportError(f"run folder '{run}' has no {name}: run `medfedpure experiment` or `train` there first")
    return read_json(path)


def _table_id(cfg: ExperimentConfig) -> str:
    return "I" if cfg.attack.norm == "l2" else "II"


def _pct(x: float | None) -> float | None:
    return None if x is None else round(100 * x, 2)


def method_runs(run: Path) -> dict[str, Path]:
    """The run folders of every method an experiment trained: MedFedPure in `run` itself,
    the baselines in `run/baselines/<method>`."""
    return {name: m.folder(run) for name, m in METHODS.items() if (m.folder(run) / SUMMARY).is_file()}


def build_tables(run: Path) -> dict:
    """Every table of a run as plain rows."""
    run = Path(run)
    runs = method_runs(run)
    if not runs:
        raise ReportError(f"run folder '{run}' has no summary.json (nor baselines/<method>/summary.json): "
                          "run `medfedpure experiment` or `train` there first")
    first = runs.get(OURS.name, next(iter(runs.values())))
    cfg = ExperimentConfig.from_dict(_load(first, CONFIG))
    env = _load(first, ENVIRONMENT)
    table = _table_id(cfg)
    setting = {"table": table, "data": cfg.data.dataset, "resolution": cfg.data.image_size,
               "clients": cfg.data.num_clients, "attack": pgd_label(cfg.attack)}
    paper = PAPER.get((table, cfg.data.dataset), {})
    rows, detection, transfer, wall, suites, missing, privacy, aggregation = [], [], [], {}, [], [], {}, {}
    for name, method in METHODS.items():
        if name not in runs:
            if method.label in paper:
                paper_clean, paper_adv = paper[method.label]
                rows.append(MethodRow(**setting, method=method.label, paper_clean=paper_clean, paper_adv=paper_adv,
                                      protocol=f"not run (medfedpure experiment --methods {name})"))
            continue
        folder = runs[name]
        summary = _load(folder, SUMMARY)
        wall[name] = _training_time(folder, summary, method.defended)
        missing += _missing_hospitals(method.label, summary, cfg.data.num_clients)
        if summary.get("privacy"):  # what the run spent: after phase 4 where it is private too (dp_pretraining)
            tuned = folder / "purifier_metrics.json"
            later = read_json(tuned) if summary.get("purifier") and tuned.is_file() else {}
            privacy[method.label] = later.get("privacy") or summary["privacy"]
        if summary.get("aggregation"):
            aggregation[method.label] = summary["aggregation"]
        evaluations = _suites(folder)
        suites += [{"method": method.label, **ev} for ev in evaluations.values()]
        suite = evaluations.get("headline", evaluations.get("suite"))  # the table's adaptive column
        rows += _method_rows(method, folder, summary, suite, setting, paper.get(method.label, (None, None)))
        if method.defended:
            detection = _detection_rows(summary)
        transfer += _transfer_rows(method, folder)
    for reference in [m for m in suites if m["method"] == REFERENCE.label]:
        # "beats plain federated adversarial training" is a paired test against it, evaluation by evaluation
        _pair_with(reference, reference["method"], suites)
    return {"run": str(run), "table": table, "rows": [r.to_dict() for r in rows], "detection": detection,
            "transfer": transfer, "suites": suites, "missing_hospitals": missing, "privacy": privacy,
            "aggregation": aggregation, "note": NOTES.get(table), "seed": cfg.seed,
            "split": {k: getattr(cfg.data, k) for k in SPLIT_FIELDS}, "git_commit": env.get("git_commit"),
            "git_dirty": env.get("git_dirty"), "packages": env.get("packages"),
            "training_s": wall.get(OURS.name, {}).get("s"), "training_time_by_method": wall,
            "rounds_by_method": {name: ExperimentConfig.from_dict(_load(folder, CONFIG)).train.rounds  # method.rounds
                                 for name, folder in runs.items()}}


def _training_time(folder: Path, summary: dict, defended: bool) -> dict:
    """A method's training seconds over every session that worked on it, and a defended method's phases
    before it and its defended evaluation after. A run timed before the training's seconds were kept
    (no `training_s`) gives the wall time of the session that finished it, and `untimed` says so (and
    whether that holds its defended evaluation)."""
    final = summary["final"]
    out = {"s": final.get("training_s", final.get("wall_time_s"))}
    if "training_s" not in final:
        evaluated = "defended_evaluation_s" in final or (summary.get("defense") and "reevaluation_s" not in final)
        out["untimed"] = "with its defended evaluation" if evaluated else "training only"
    if defended:
        tuned = ("purifier",) if summary.get("purifier") else ()  # phase 4's only where the evaluation used it
        for phase in ("diffusion", "mae", *tuned):
            path = folder / f"{phase}_metrics.json"
            kept = read_json(path) if path.is_file() else {}
            seconds = kept.get("training_s") if kept.get("training_s") is not None else kept.get("wall_time_s")
            if seconds is not None:
                out[phase] = seconds
        evaluation = final.get("defended_evaluation_s", final.get("reevaluation_s"))
        if evaluation is not None:
            out["defended evaluation"] = evaluation
    return out


def _missing_hospitals(label: str, summary: dict, num_clients: int) -> list[str]:
    """A line per method whose final or defended figures are a mean over fewer hospitals than the
    federation has (a hospital lost in the last round or in the defended evaluation), naming the
    missing ones and what the log said."""
    answered = {c.get("client") for c in summary.get("clients", [])}
    absent = [c for c in range(num_clients) if c not in answered]
    failures = summary.get("failures", [])
    last = {f.get("client"): f.get("error", "") for f in failures if f.get("client") is not None}
    lines = []
    if absent:
        why = "; ".join(f"client {c}: {last[c]}" for c in absent if c in last)
        lines.append(f"{label}: the final figures are means over {num_clients - len(absent)} of {num_clients} "
                     f"hospitals; missing in the last round: client(s) {', '.join(map(str, absent))}"
                     + (f" ({why})" if why else ""))
    lost = [f for f in failures if f.get("phase") == "defended evaluation"]
    if lost:
        who = "; ".join(f"client {f['client'] if f.get('client') is not None else '?'}: {f.get('error', '')}"
                        for f in lost)
        lines.append(f"{label}: the defended figures are means over {num_clients - len(lost)} of {num_clients} "
                     f"hospitals; missing in the defended evaluation: {who}")
    return lines


def _method_rows(method, folder: Path, summary: dict, suite: dict | None, setting: dict,
                 paper: tuple[float | None, float | None]) -> list[MethodRow]:
    """A method's bare row (white-box PGD on its classifier), and ours behind its defense."""
    mcfg = ExperimentConfig.from_dict(_load(folder, CONFIG))
    final = summary["final"]
    model = f"K={method.num_models(mcfg)} x {mcfg.model.backbone}"
    ours = method.defended
    rows = [MethodRow(**setting, model=model, method="MoE, no defense (ours)" if ours else method.label,
                      protocol="white-box PGD on the classifier" + method.training_note(mcfg),
                      clean=_pct(final["clean_acc"]), adv=_pct(final.get("adv_acc")),
                      **_adaptive(None if ours else suite),
                      paper_clean=None if ours else paper[0], paper_adv=None if ours else paper[1])]
    if not ours:
        return rows
    # the defense the attack suite evaluated (the experiment's current one), else the trained config's
    shown = suite["defense"] if suite and suite.get("defense") else {"detector": mcfg.defense.detector,
                                                                     "mode": mcfg.defense.mode}
    headline = next((r for r in summary.get("defense", [])
                     if r["detector"] == shown["detector"] and r["mode"] == shown["mode"]), None)
    if headline is not None:
        label = f"{method.label} ({shown['mode']}, {shown['detector']} detector)"
        rows.append(MethodRow(**setting, model=model, method=label,
                              protocol="adv: paper protocol (PGD on the classifier, then the defense); "
                                       "adaptive: the defense attacked as a whole",
                              clean=_pct(headline["clean_acc"]), adv=_pct(headline["adv_acc"]),
                              **_adaptive(suite), paper_clean=paper[0], paper_adv=paper[1]))
    return rows


def _detection_rows(summary: dict) -> list[dict]:
    return [{"detector": r["detector"], "mode": r["mode"], "rule": r["rule"],
             "auroc": round(r["auroc"], 4), "tpr_at_tau": round(r["tpr_at_tau"], 4),
             "fpr_at_tau": round(r["fpr_at_tau"], 4), "clean": _pct(r["clean_acc"]),
             "adv": _pct(r["adv_acc"]), "purified_clean": _pct(r["clean_purified"]),
             "purified_adv": _pct(r["adv_purified"]), "mean_t_adv": round(r["adv_mean_t"], 1),
             "score_ms": round(r["adv_score_ms"], 2), "purify_ms": round(r["adv_purify_ms"], 2),
             "classify_ms": round(r["adv_classify_ms"], 2)}
            for r in summary.get("defense", [])]


def _transfer_rows(method, folder: Path) -> list[dict]:
    if not (folder / "transfer.json").is_file():
        return []
    t = read_json(folder / "transfer.json")
    return [{"method": method.label + (" + defense" if kind == "defended" else ""),
             "white_box_diagonal": _pct(t[kind]["diagonal_mean"]),
             "transfer_off_diagonal": _pct(t[kind]["off_diagonal_mean"]),
             "clean_off_diagonal": _pct(t[kind].get("clean_off_diagonal_mean")),
             "n_adv_per_attacker": sum(t["n_adv_per_attacker"]) / len(t["n_adv_per_attacker"])}
            for kind in ("bare", "defended") if kind in t]


def _suites(folder: Path) -> dict[str, dict]:
    """A method's own-test evaluations (what `experiment` ran), by kind: the suite, the headline on
    more scans, the convergence check."""
    out = {}
    for kind in OWN_TEST_EVALUATIONS:
        path = default_suite_dir(folder, kind) / "evaluation.json"
        if path.is_file() and not current_purifier(path.parent, folder):
            log.warning("%s was made with a U-Net the run no longer uses (before phase 4): not reported", path)
        elif path.is_file():
            ev = read_json(path)
            out[kind] = {"kind": kind, "headline": ev["headline"], "suite": ev["suite"], "defense": ev["defense"],
                         "scans": Headline.from_dict(ev["headline"]).n, "scan_ids": ev.get("scans"),
                         "convergence": ev.get("convergence", [])}
    return out


def _pair_with(reference: dict, label: str, suites: list[dict]) -> None:
    """Each other method's evaluation of the same kind paired with `reference`'s under that method's
    strongest attack (McNemar's exact test on the first-draw outcomes of the same scans), as `paired`."""
    ref = {"suite": reference["suite"], "scans": reference["scan_ids"]}
    for m in suites:
        if m is not reference and m["kind"] == reference["kind"]:
            m["paired"] = paired_test(ref, {"suite": m["suite"], "scans": m["scan_ids"]},
                                      Headline.from_dict(m["headline"]).attack, label).to_dict()


def _adaptive(suite: dict | None) -> dict:
    """The adaptive column: the lowest first-draw accuracy over the attacks that know the defense."""
    if suite is None:
        return {"adaptive": None, "adaptive_ci": None, "adaptive_attack": None}
    h = Headline.from_dict(suite["headline"])
    return {"adaptive": _pct(h.first), "adaptive_ci": [_pct(v) for v in h.first_ci],
            "adaptive_attack": h.label(budget_label(h.settings))}


def methods_markdown(tables: dict) -> str:
    """A run's Table I / II rows (ours beside the paper's) with their note, any missing hospital and each
    method's training wall time: what tables.md opens with, and what `report --docs` puts in a document's
    block from a result published by `report --run RUN --publish`."""
    lines = [table(["data", "px", "model", "attack", "method", "protocol", "clean", "adv", "adaptive", "paper clean",
                    "paper adv"],
                   [[r.data, r.resolution, r.model, r.attack, r.method, r.protocol, r.clean, r.adv, r.adaptive_cell(),
                     r.paper_clean, r.paper_adv] for r in map(MethodRow.from_dict, tables["rows"])])]
    if tables["note"]:
        lines += ["", tables["note"]]
    for line in tables.get("missing_hospitals", []):
        lines += ["", f"**A hospital is missing.** {line}."]
    if tables.get("training_time_by_method"):
        rounds = tables.get("rounds_by_method", {})
        lines += ["", "Training wall time (s) per method, over every session that worked on it: " + ", ".join(
            _time_cell(k, t, rounds.get(k)) for k, t in tables["training_time_by_method"].items())]
    if len(tables.get("sources") or []) > 1:
        lines += ["", f"Rows from {len(tables['sources'])} runs of the same preset and seed: "
                  + "; ".join(map(_source_cell, tables["sources"])) + "."]
    return "\n".join(lines)


def _source_cell(source: dict) -> str:
    """'~/runs/table1 at git commit 5fb7f2f (with uncommitted changes): medfedpure, fedavg'."""
    dirty = " (with uncommitted changes)" if source.get("git_dirty") else ""
    commit = (source.get("git_commit") or "?")[:7]
    return f"{source['run']} at git commit {commit}{dirty}: {', '.join(source['methods'])}"


def _time_cell(method: str, t: dict, rounds: int | None) -> str:
    """'medfedpure 2398 (22 rounds; before them U-Net 371, MAE 191; its defended evaluation 1500)'."""
    said = [f"{rounds} rounds"] if rounds else []
    if t.get("untimed"):
        said.append(f"timed before the training was counted apart: the wall time of the session that finished it, "
                    f"{t['untimed']}")
    phases = [f"{PHASE_WORDS[p]} {t[p]}" for p in ("diffusion", "mae") if p in t]
    said += [f"before them {', '.join(phases)}"] if phases else []
    said += [f"after them {PHASE_WORDS['purifier']} {t['purifier']}"] if "purifier" in t else []
    said += [f"its defended evaluation {t['defended evaluation']}"] if "defended evaluation" in t else []
    return f"{method} {t['s']}" + (f" ({'; '.join(said)})" if said else "")


# what a published run result keeps (`report --run RUN --publish`): the rows and what they are read with,
# not the per-scan outcomes of its evaluations (those stay in the run folder)
PUBLISHED_KEYS = ("run", "table", "rows", "note", "missing_hospitals", "training_time_by_method", "rounds_by_method",
                  "seed", "split", "git_commit", "git_dirty")


def publish_tables(tables: dict, path: Path | str, add: bool = False) -> list[Path]:
    """A run's tables kept in `docs/results/` as `path` (.json, the run folder named from ~) and its
    methods figure beside it (.png), for `medfedpure report --docs` and the documents that show it.
    With `add`, the methods this run did not make keep the rows already published at `path`
    (`added_to`): one table made by several runs of the same preset and seed, each named."""
    path = publish_path(path)
    kept = {"kind": "methods", **{k: tables.get(k) for k in PUBLISHED_KEYS}, "run": from_home(tables["run"])}
    if add:
        kept = added_to(read_json(path) if path.is_file() else None, kept, path)
    write_json(path, kept)
    plot_method_comparison([MethodRow.from_dict(r) for r in kept["rows"]], path.with_suffix(".png"),
                           _figure_title(kept))
    return [path, path.with_suffix(".png")]


def _method_of(row: dict) -> str:
    """The method (METHODS' name) a published row belongs to: a baseline by its label, ours otherwise
    (its bare MoE row and its defended row carry other labels)."""
    return next((n for n, m in METHODS.items() if m.label == row["method"] and not m.defended), OURS.name)


def _sources(result: dict) -> list[dict]:
    """The runs a published result's rows come from: its `sources`, or its one run."""
    return result.get("sources") or [{"run": result["run"], "git_commit": result.get("git_commit"),
                                      "git_dirty": result.get("git_dirty"), "split": result.get("split"),
                                      "methods": list(result.get("training_time_by_method") or {})}]


def added_to(earlier: dict | None, new: dict, path: Path) -> dict:
    """`new` (a run's publication) with the rows, times and rounds of every method it did not make taken
    from `earlier` (what `path` holds), which must be the same table on the same setting and seed; the
    result names each run (`sources`) and which methods it made. A ValueError names the field that differs."""
    if earlier is None or earlier.get("kind") != "methods":
        raise ValueError(f"--add: {path} holds no published Table I / II rows to add to (publish without --add)")
    setting = ("table", "data", "resolution", "clients", "attack")
    splits = [s["split"] for s in _sources(earlier) if s.get("split")]  # a result published before it was kept has none
    for field, a, b in [("seed", earlier.get("seed"), new["seed"]), ("table", earlier["table"], new["table"])] + [
            (f"rows' {f}", {r[f] for r in earlier["rows"]}, {r[f] for r in new["rows"]}) for f in setting[1:]] + [
            (f"data.{f}", split.get(f), new["split"].get(f)) for split in splits for f in SPLIT_FIELDS]:
        if a != b:
            raise ValueError(f"--add: {path} holds another setting ({field} {a} there, {b} in this run)")
    made = list(new["training_time_by_method"])
    kept = [n for n in earlier.get("training_time_by_method") or {} if n not in made]
    rows = [r for name in METHODS for r in (earlier if name in kept else new)["rows"] if _method_of(r) == name]
    times = {n: (earlier if n in kept else new)["training_time_by_method"][n] for n in METHODS if n in kept + made}
    rounds = {n: (earlier if n in kept else new)["rounds_by_method"][n] for n in times}
    missing = [line for line in earlier.get("missing_hospitals") or []
               if any(line.startswith(METHODS[n].label + ":") for n in kept)] + list(new["missing_hospitals"])
    sources = [{**s, "methods": [n for n in s["methods"] if n in kept]} for s in _sources(earlier)]
    sources = [s for s in sources if s["methods"]] + [{"run": new["run"], "git_commit": new["git_commit"],
                                                       "git_dirty": new["git_dirty"], "split": new["split"],
                                                       "methods": made}]
    return {**new, "rows": rows, "training_time_by_method": times, "rounds_by_method": rounds,
            "missing_hospitals": missing, "sources": sources}


def _figure_title(tables: dict) -> str:
    first = tables["rows"][0]
    return f"Table {tables['table']}: {first['data']} {first['resolution']}px, {first['attack']}"


def _markdown(tables: dict) -> str:
    lines = [f"# Results: {tables['run']}", "",
             f"## Table {tables['table']} rows (ours beside the paper's; accuracy %)", "",
             "adaptive: the lowest first-draw accuracy over the attack suite that knows the defense (95% "
             "Clopper-Pearson interval, its attack and budget); for an undefended model these attacks are "
             "white-box PGD and Square. This is a defended method's headline; adv is the paper's protocol.", "",
             methods_markdown(tables)]
    for label, p in tables.get("privacy", {}).items():
        what, rounds = "expert update", f"{p['rounds']} rounds"
        if p.get("phases"):  # federation.dp_pretraining: every model that leaves a hospital, one budget
            what = "update of every model it sends"
            rounds = (f"{sum(p['phases'].values())} rounds over the phases ("
                      + ", ".join(f"{PHASE_WORDS.get(k, k)} {v}" for k, v in p["phases"].items()) + ")")
        lines += ["", f"**Differential privacy ({label}).** Each hospital's {what} clipped to L2 norm "
                      f"{p['clipping_norm']:g}, Gaussian noise of multiplier {p['noise_multiplier']:.3g} on the mean, "
                      f"{rounds}: (epsilon {p['epsilon']:.3g}, delta {p['delta']:g}) per hospital "
                      "(client-level, RDP accountant, no sampling amplification; round metrics are not covered)."]
    for label, a in tables.get("aggregation", {}).items():
        how = ", ".join(ROBUST_WORDS.get(rule, rule).format(**a) for rule in a["rule"].split(", "))
        rounds = f"{a['rounds']} round" + ("s" if a["rounds"] != 1 else "")
        lines += ["", f"**Robust aggregation ({label}).** Over {rounds}, each round's experts are {how} of the "
                      "hospitals' replies, every hospital weighing alike (Flower's rule; the round metrics stay "
                      "n-weighted means)."]
    if tables.get("suites"):
        lines += ["", "In the attack tables below, each attacked scan is answered N times (`attack.draws`) with fresh "
                      "purification noise: *first draw* is the first answer (what one submission sees), *majority* "
                      "the vote of the N answers, *worst of N* the share right on every one of them (an attacker "
                      "who may resubmit N times); *flagged* is the share of attacked scans the detector flags. A "
                      "model without a defense answers once, and the three agree."]
    for m in tables.get("suites", []):
        lines += _suite_lines(m)
    lines += _detection_lines(tables["detection"]) + _transfer_lines(tables.get("transfer"))
    dirty = " (with uncommitted changes)" if tables.get("git_dirty") else ""
    lines += ["", f"seed {tables['seed']}, git commit {tables['git_commit']}{dirty}, "
              f"packages {json.dumps(tables['packages'])}", ""]
    return "\n".join(lines)


def _suite_lines(m: dict) -> list[str]:
    d = m["defense"]
    where = (f"behind its defense ({d['mode']}, {d['detector']} detector, t* in [{d['t_min']}, {d['t_max']}], "
             f"{d['votes']} purification(s))" if d else "no defense")
    title = {"suite": "Attack suite", "headline": "Headline attacks", "convergence": "Convergence check"}[m["kind"]]
    rows = [[name, budget_label(p.settings), p.n, with_interval(p.first, p.first_ci), percent(p.majority),
             percent(p.worst), None if p.flagged is None else percent(p.flagged)]
            for name, p in ((name, AttackResult.from_dict(p)) for name, p in m["suite"].items())]
    lines = ["", f"## {title}: {m['method']}, {where}, each client's own test split", "",
             table(["attack", "budget", "scans", "first draw [95% CI]", "majority", "worst of N", "flagged"], rows)]
    if m.get("convergence"):
        lines += [""] + convergence_lines(m["convergence"])[:-1]
    paired = PairedTest.from_dict(m["paired"]) if m.get("paired") else None
    if paired and paired.unavailable is not None:
        lines += ["", f"Paired with {paired.against}: n/a ({paired.unavailable})."]
    elif paired:
        lines += ["", f"Paired with {paired.against} under {paired.attack} (first draw, the same {paired.n} "
                      f"scans): {paired.b_correct} vs {paired.a_correct} correct; right only here on "
                      f"{paired.only_b} scans, only under {paired.against} on {paired.only_a}; McNemar's exact "
                      f"p = {paired.p_value:.3g}: "
                      + ("**beats it** (more accurate, p < 0.05)." if paired.beats
                         else "does not beat it (beating needs more accuracy and p < 0.05).")]
    return lines


def _detection_lines(detection: list[dict]) -> list[str]:
    if not detection:
        return []
    keys = ("detector", "mode", "rule", "auroc", "tpr_at_tau", "fpr_at_tau", "clean", "adv", "purified_clean",
            "purified_adv", "mean_t_adv", "score_ms", "purify_ms", "classify_ms")
    return ["", "## Detection and purification (test-size-weighted mean over clients)", "",
            table(["detector", "mode", "rule", "AUROC", "TPR at tau", "FPR at tau", "clean %", "adv %",
                   "purified clean %", "purified adv %", "mean t* (adv)", "score ms", "purify ms", "classify ms"],
                  [[r[k] for k in keys] for r in detection])]


def _transfer_lines(transfer: list[dict] | None) -> list[str]:
    if not transfer:
        return []
    return ["", "## Internal evasion (each client's PGD sent to every other client; accuracy %)", "",
            table(["method", "white-box (diagonal mean)", "transferred (off-diagonal mean)",
                   "other clients' scans unattacked (off-diagonal mean)", "scans per attacker"],
                  [[r["method"], r["white_box_diagonal"], r["transfer_off_diagonal"], r.get("clean_off_diagonal"),
                    f"{r['n_adv_per_attacker']:g}"] for r in transfer])]


def write_report(run: Path | str) -> dict:
    """tables.md / tables.csv / tables.json and the convergence figure, from saved results only."""
    run = Path(run)
    tables = build_tables(run)
    write_json(run / "tables.json", tables)
    write_csv(run / "tables.csv", tables["rows"])
    if tables["detection"]:
        write_csv(run / "detection.csv", tables["detection"])
    atomic_write_text(run / "tables.md", _markdown(tables))
    for name, folder in method_runs(run).items():
        cfg = ExperimentConfig.from_dict(_load(folder, CONFIG))
        metrics = _load(folder, "metrics.json")
        plot_convergence(metrics["rows"], folder / "accuracy_per_round.png",
                         f"{cfg.name} / {name}: {cfg.data.dataset} {cfg.data.image_size}px, "
                         f"{cfg.data.num_clients} clients, {cfg.model.backbone}", metrics["attack"])
    if len(tables["rows"]) > 1:
        plot_method_comparison([MethodRow.from_dict(r) for r in tables["rows"]], run / "methods.png",
                               _figure_title(tables))
    return tables
