"""`medfedpure compare-defenses SPEC.yaml`: defense candidates under the same attacks, on the same scans.

A spec names the attacks, the scans (`max_per_client` of each client's own test split) and
the common overrides once, then each candidate as a trained run plus its own `defense.*`
overrides (an undefended baseline is a run without overrides). Each candidate's suite lands in
`<out>/<candidate>/` and is not redone when the request is unchanged, so an interrupted
comparison resumes. A candidate may instead name suite evaluations already made (`from:`, one
folder or a list, e.g. the one `experiment` wrote, or one evaluation per loss): they are used only
if together they ran every attack of the spec, each on the same scans with the same budget. A
candidate's `convergence:` names its convergence check (a folder, or a list of them: one per attack
checked), a column of the table.
`candidates.md/.json/.png` put clean accuracy, the strongest attack's accuracy and latency side
by side (the frontier).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path


from medfedpure.attacks import parse_attacks
from medfedpure.config import ConfigError, ExperimentConfig, apply_overrides, read_yaml_file
from medfedpure.evaluation.attack_suite import (budget_label, current_purifier, evaluate_suite, headline_of, paired_test,
                                               suite_done, suite_request, worst_of_n_attack)
from medfedpure.reporting.markdown import percent, table, with_interval
from medfedpure.reporting.plots import plot_frontier
from medfedpure.reporting.published import from_home, publish_path
from medfedpure.reporting.rows import AttackResult, CandidateRow, Comparison, Convergence, Headline
from medfedpure.storage import atomic_write_text, read_json, write_json
from medfedpure.runfolder import CONFIG

SPEC_FIELDS = {"attacks", "max_per_client", "overrides", "candidates"}
CANDIDATE_FIELDS = {"name", "run", "overrides", "note", "from", "convergence"}
# what must agree for an earlier suite evaluation to stand in for a candidate's
BUDGET_FIELDS = ("norm", "eps", "alpha", "steps", "adaptive_steps", "eot", "loss", "detector_weight", "square_queries",
                 "draws", "random_start")


def load_spec(path: Path) -> dict:
    spec = read_yaml_file(Path(path), "candidate spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("candidates"), list) or not spec["candidates"]:
        raise ConfigError(f"candidate spec '{path}': needs a non-empty list 'candidates'")
    unknown = set(spec) - SPEC_FIELDS
    if unknown:
        raise ConfigError(f"candidate spec '{path}': unknown field(s) {sorted(unknown)}")
    names = []
    for i, c in enumerate(spec["candidates"]):
        if not isinstance(c, dict) or not {"name", "run"} <= set(c) or set(c) - CANDIDATE_FIELDS:
            raise ConfigError(f"candidate spec '{path}': candidate {i + 1} needs 'name' and 'run' "
                              f"(and optionally {sorted(CANDIDATE_FIELDS - {'name', 'run'})})")
        if "from" in c and c.get("overrides"):
            raise ConfigError(f"candidate spec '{path}': candidate '{c['name']}' takes 'from' or 'overrides', not both")
        if isinstance(c.get("run"), str):  # a home-relative path (~/runs/...) as a shell would read it
            c["run"] = str(Path(c["run"]).expanduser())
        for key in ("from", "convergence"):  # a folder or a list of them
            if isinstance(c.get(key), str):
                c[key] = str(Path(c[key]).expanduser())
            elif isinstance(c.get(key), list) and c[key] and all(isinstance(p, str) for p in c[key]):
                c[key] = [str(Path(p).expanduser()) for p in c[key]]
            elif key in c:
                raise ConfigError(f"candidate spec '{path}': candidate '{c['name']}': '{key}' is a folder or a "
                                  "list of them")
        names.append(c["name"])
    if len(set(names)) != len(names):
        raise ConfigError(f"candidate spec '{path}': candidate names repeat")
    spec["attacks"] = parse_attacks(",".join(spec.get("attacks") or ["adaptive"]) if isinstance(
        spec.get("attacks"), list) else str(spec.get("attacks", "adaptive")))
    return spec


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def compare_defenses(spec_path: Path | str, out: Path | str, progress: bool = True) -> Comparison:
    spec = load_spec(Path(spec_path))
    out = Path(out)
    for c in spec["candidates"]:  # fail before hours of attacks, not after
        if "from" in c:
            _reuse(c, spec)
        elif not (Path(c["run"]) / CONFIG).is_file():
            raise FileNotFoundError(f"candidate '{c['name']}': run folder '{c['run']}' has no config.json")
    rows, evaluations = [], []
    for c in spec["candidates"]:
        if "from" in c:
            evaluations.append(_reuse(c, spec))
            rows.append(_row(c, evaluations[-1]))
            continue
        folder = out / slug(c["name"])
        overrides = [*spec.get("overrides", []), *c.get("overrides", [])]
        request = suite_request(c["run"], None, spec["attacks"], "all", overrides, spec.get("max_per_client"))
        if not suite_done(folder, request):
            if progress:
                print(f"candidate {c['name']}: {c['run']} {' '.join(overrides)}", flush=True)
            evaluate_suite(c["run"], None, spec["attacks"], overrides=overrides, out=folder,
                           max_per_client=spec.get("max_per_client"), progress=progress)
        evaluations.append(read_json(folder / "evaluation.json"))
        rows.append(_row(c, evaluations[-1]))
    rows[1:] = [replace(row, paired=paired_test(evaluations[0], ev, row.strongest, rows[0].name),
                        paired_worst=paired_test(evaluations[0], ev, row.worst_attack, rows[0].name, "worst"))
                for row, ev in zip(rows[1:], evaluations[1:])]
    rows = [replace(row, convergence=_convergence(c, row, ev)) if "convergence" in c else row
            for row, c, ev in zip(rows, spec["candidates"], evaluations)]
    result = Comparison(spec=str(spec_path), attacks=spec["attacks"], max_per_client=spec.get("max_per_client"),
                        overrides=spec.get("overrides", []), rows=rows)
    write_json(out / "candidates.json", result.to_dict())
    atomic_write_text(out / "candidates.md", candidates_markdown(result))
    plot_frontier(rows, out / "candidates.png")
    return result


def _reuse(candidate: dict, spec: dict) -> dict:
    """This candidate's earlier suite evaluations (`from:`, one or several), each checked to be comparable
    with the others, as one: every attack of each, on the scans they share, with the headline taken
    again over the spec's attacks."""
    folders = candidate["from"] if isinstance(candidate["from"], list) else [candidate["from"]]
    evaluations = [_earlier(candidate, Path(f), spec) for f in folders]
    first = evaluations[0]
    for folder, e in zip(folders[1:], evaluations[1:]):
        for what, key in (("scans", "scans"), ("defense settings", "defense"), ("overrides", "overrides")):
            if e.get(key) != first.get(key):
                raise ConfigError(f"candidate '{candidate['name']}': '{folder}' differs from '{folders[0]}' in its "
                                  f"{what}: they cannot stand in for one evaluation")
    suite = {k: v for e in reversed(evaluations) for k, v in e["suite"].items()}  # a repeated attack: the first's
    missing = [a for a in spec["attacks"] if a not in suite]
    if missing:
        raise ConfigError(f"candidate '{candidate['name']}': {folders} did not run {missing} (the spec's attacks: "
                          f"{spec['attacks']})")
    # the headline over the spec's attacks, from the merged results
    return dict(first, suite=suite, headline=headline_of(spec["attacks"], suite).to_dict(), attacks=spec["attacks"])


def _earlier(candidate: dict, folder: Path, spec: dict) -> dict:
    """One earlier suite evaluation of the candidate's run, checked against the spec's budget and scans."""
    path = folder / "evaluation.json"
    if not path.is_file():
        raise FileNotFoundError(f"candidate '{candidate['name']}': no suite evaluation at '{path}'")
    ev = dict(read_json(path), overrides=_request(folder).get("overrides"))
    config = Path(candidate["run"]) / CONFIG
    if not config.is_file():
        raise FileNotFoundError(f"candidate '{candidate['name']}': run folder '{candidate['run']}' has no config.json")
    probe = apply_overrides(ExperimentConfig.from_dict(read_json(config)),
                            [o for o in spec.get("overrides", []) if o.startswith("attack.")])
    problems = [f"{k} {ev['attack_config'].get(k)} (spec: {getattr(probe.attack, k)})" for k in BUDGET_FIELDS
                if ev["attack_config"].get(k) != getattr(probe.attack, k)]
    if ev.get("max_per_client") != spec.get("max_per_client"):
        problems.append(f"max_per_client {ev.get('max_per_client')} (spec: {spec.get('max_per_client')})")
    if not current_purifier(path.parent, candidate["run"]):
        problems.append("the U-Net it purified with (the run has fine-tuned another since: phase 4)")
    if problems or not ev["data"].startswith("each client's own test split"):
        raise ConfigError(f"candidate '{candidate['name']}': '{path}' is not comparable with the spec "
                          f"(differs in {problems or 'nothing else'}; data {ev['data']})")
    return ev


def _request(folder: Path) -> dict:
    """What an evaluation folder was asked for (its request.json; {} for one made before it was kept)."""
    path = folder / "request.json"
    return read_json(path) if path.is_file() else {}


def _convergence(candidate: dict, row: CandidateRow, ev: dict) -> list[Convergence]:
    """The candidate's convergence checks (`convergence:`, evaluations of its run with an attack at the
    suite's budget beside the same attack at a larger one, e.g. eot-pgd:margin and eot-pgd:margin@200x20
    on 5 scans a hospital), each checked to be of this run, its current U-Net and the same defense
    settings; one of them must check the candidate's strongest attack (or one level with it)."""
    folders = candidate["convergence"]
    entries = [e for folder in ([folders] if isinstance(folders, str) else folders)
               for e in _convergence_entries(candidate, Path(folder), ev)]
    tied = {row.strongest} | {a for a, first in row.per_attack.items() if first == row.robust}  # or level with it
    if not any(c.attack in tied for c in entries):
        level = ", ".join(sorted(tied - {row.strongest}))
        also = f" (or of {level}, level with it)" if level else ""
        raise ConfigError(f"candidate '{candidate['name']}': no convergence check of its strongest attack, "
                          f"{row.strongest}{also}, at a second budget (e.g. --attack {row.strongest},"
                          f"{row.strongest}@200x20)")
    return entries


def _convergence_entries(candidate: dict, folder: Path, ev: dict) -> list[Convergence]:
    """One convergence evaluation's entries, once it is shown to be of the candidate's run as it stands."""
    path = folder / "evaluation.json"
    if not path.is_file():
        raise FileNotFoundError(f"candidate '{candidate['name']}': no convergence evaluation at '{path}' "
                                "(an unfinished one resumes where it stopped: run its command again)")
    check = read_json(path)
    run = _request(folder).get("run", check["run"])  # the request keeps the run's absolute path
    problems = []
    if Path(run).resolve() != Path(candidate["run"]).resolve():
        problems.append(f"it evaluated '{run}'")
    if not current_purifier(folder, candidate["run"]):
        problems.append("its U-Net is not the run's (phase 4 has fine-tuned another since)")
    if check.get("defense") != ev.get("defense"):
        problems.append(f"its defense settings {check.get('defense')} (the candidate's: {ev.get('defense')})")
    if not check.get("convergence"):
        problems.append("it ran no attack at two budgets (e.g. --attack eot-pgd:margin,eot-pgd:margin@200x20)")
    if problems:
        raise ConfigError(f"candidate '{candidate['name']}': '{path}' is no convergence check of it: "
                          + "; ".join(problems))
    return [Convergence.from_dict(c) for c in check.get("convergence", [])]


def _row(candidate: dict, ev: dict) -> CandidateRow:
    suite = {name: AttackResult.from_dict(p) for name, p in ev["suite"].items()}
    clean = suite.get("clean (whole split)", suite["clean"])
    name = Headline.from_dict(ev["headline"]).attack
    strongest, worst = suite[name], worst_of_n_attack(ev["attacks"], ev["suite"], name)
    return CandidateRow(name=candidate["name"], run=candidate["run"], overrides=candidate.get("overrides", []),
                        note=candidate.get("note", ""), defense=ev["defense"],
                        clean=clean.first, clean_ci=clean.first_ci, clean_n=clean.n,
                        robust=strongest.first, robust_ci=strongest.first_ci, robust_n=strongest.n,
                        strongest=name, budget=budget_label(strongest.settings),
                        robust_majority=strongest.majority, robust_worst=suite[worst].worst, worst_attack=worst,
                        per_attack={a: suite[a].first for a in ev["attacks"]}, latency_ms=suite["clean"].latency_ms)


def candidates_table(result: Comparison) -> str:
    """The frontier as one markdown table: each candidate's clean and strongest-attack accuracy with
    their intervals, majority and worst of N, every attack, latency, and the paired test with the first."""
    checked = any(r.convergence is not None for r in result.rows)  # the column only where a candidate has one
    resubmitted = any(r.paired_worst is not None for r in result.rows)  # a result published before it had none
    header = ["candidate", "clean % [CI]", "robust % [CI]", "strongest attack", "majority", "worst of N",
              *result.attacks, "ms / scan", "paired with the first",
              *(["paired at worst of N"] if resubmitted else []), *(["convergence check"] if checked else [])]
    rows = [[r.name, with_interval(r.clean, r.clean_ci), with_interval(r.robust, r.robust_ci),
             f"{r.strongest} ({r.budget})", percent(r.robust_majority), _worst_cell(r),
             *[percent(r.per_attack.get(a)) for a in result.attacks],
             "" if r.latency_ms is None else f"{r.latency_ms:.1f}",
             "(reference)" if r.paired is None else r.paired.cell(),
             *([_paired_worst_cell(r)] if resubmitted else []),
             *(["; ".join(c.cell() for c in r.convergence or [])] if checked else [])]
            for r in result.rows]
    return table(header, rows)


def _worst_cell(row: CandidateRow) -> str:
    """The lowest worst of N, naming its attack where that is not the first-draw strongest one."""
    named = row.worst_attack is not None and row.worst_attack != row.strongest and row.robust_worst is not None
    return percent(row.robust_worst) + (f" ({row.worst_attack})" if named else "")


def _paired_worst_cell(row: CandidateRow) -> str:
    if row.paired_worst is None:
        return "(reference)" if row.paired is None else ""
    return row.paired_worst.cell() + ("" if row.paired_worst.unavailable else f" ({row.paired_worst.attack})")


def candidates_markdown(result: Comparison) -> str:
    attacks = result.attacks
    lines = [f"# Defense candidates ({result.spec})", "",
             f"Attacks: {', '.join(attacks)}; at most {result.max_per_client or 'all'} scans per client of its "
             f"own test split; common overrides: {' '.join(result.overrides) or 'none'}. Robust = the lowest "
             "first-draw accuracy over these attacks (95% Clopper-Pearson interval); clean = first draw on "
             "every scan of the test splits.", "", candidates_table(result)]
    missing = [f"{r.name}{where}: {test.unavailable}" for r in result.rows
               for test, where in ((r.paired, ""), (r.paired_worst, " at worst of N"))
               if test is not None and test.unavailable is not None]
    lines += ["", "Paired with the first: under the candidate's strongest attack, on the same scans, the scans only "
              "this candidate answers correctly (first draw) vs those only the first one does, and McNemar's exact "
              "p; a candidate beats the first when it is more accurate with p < 0.05. Worst of N: the lowest, over "
              "the attacks that know the defense, of the accuracy when every attacked scan counts as wrong if any of "
              "its N answers is (resubmission); paired at worst of N: the same test under that attack on those "
              "answers (a deterministic model's worst is its first)."
              + (f" n/a: {'; '.join(missing)}." if missing else "")]
    if any(r.convergence for r in result.rows):
        lines += ["", "Convergence check: the candidate's strongest attack at a larger budget (steps x draws) beside "
                  "the same attack at the study's budget, first draw, on the same scans (a subset: its count is "
                  "given); NOT converged where the larger budget is lower beyond the study's interval, and then "
                  "the study's budget understates the attack."]
    lines += ["", "Candidates:", ""]
    lines += [f"- **{r.name}**: `{r.run}` {' '.join(r.overrides)}" + (f" ({r.note})" if r.note else "")
              for r in result.rows]
    return "\n".join(lines) + "\n"


def publish(result: Comparison, path: Path | str) -> list[Path]:
    """`result` kept in `docs/results/` as `path` (.json, run folders named from ~) and its frontier
    figure beside it (.png), for `medfedpure report --docs` and the documents that show it."""
    path = publish_path(path)
    write_json(path, publishable(result))
    plot_frontier(result.rows, path.with_suffix(".png"))
    return [path, path.with_suffix(".png")]


def publishable(result: Comparison) -> dict:
    """A comparison as `docs/results/` keeps it: run folders named from the home folder (~/runs/...)."""
    return replace(result, rows=[replace(r, run=from_home(r.run)) for r in result.rows]).to_dict()
