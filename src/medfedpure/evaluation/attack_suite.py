"""`medfedpure evaluate --attack ...`: a trained run's clients under the attack suite.

Each client's personalized classifier, behind its own defense when the run has one
(`defense.detector`, `defense.mode`, its own calibration), is attacked on its own scans (its
test split, or a folder), `--max-per-client` of them spread evenly over the split. The attacks
that know the defense get the whole defended classifier; `pgd` keeps the paper's protocol.
Writes `evaluation.json/.csv/.md` and `robustness.png`; the headline is the lowest first-draw
accuracy over the attacks that know the defense.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medfedpure.attacks import ATTACKS, SUITE, base_attack, parse_attack_name
from medfedpure.evaluation.robustness import VERDICTS, Tally, answer, attack_cost, mcnemar, run_suite, scan_ids
from medfedpure.evaluation.runs import RunUnderTest, open_run
from medfedpure.loop import channels_last
from medfedpure.methods import task
from medfedpure.metrics import attacked_positions
from medfedpure.reporting.markdown import percent, table, with_interval
from medfedpure.reporting.rows import AttackResult, Convergence, Headline, PairedTest
from medfedpure.reporting.plots import plot_suite
from medfedpure.storage import atomic_write_text, read_json, write_csv, write_json
from medfedpure.runfolder import SUMMARY, RunFolder

# the own-test evaluations `experiment` runs after training, by kind: (the attack.* list it runs,
# the attack.* field capping its scans per client)
OWN_TEST_EVALUATIONS = {"suite": ("suite", "suite_max_per_client"),
                        "headline": ("headline", "headline_max_per_client"),
                        "convergence": ("convergence", "convergence_max_per_client")}


def default_suite_dir(run: Path | str, kind: str = "suite") -> Path:
    """Where `experiment` and `report` keep a run's own-test evaluation of that kind."""
    if kind not in OWN_TEST_EVALUATIONS:
        raise ValueError(f"unknown own-test evaluation '{kind}' ({', '.join(OWN_TEST_EVALUATIONS)})")
    return RunFolder.of(run).evaluations / f"own-test-{kind}"


def _client_scans(r: RunUnderTest, client: int, cap: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(attacked scans, labels, size of the whole split)."""
    xs, ys = zip(*r.loaders[client])
    x, y = torch.cat(xs), torch.cat(ys)
    positions = attacked_positions(len(y), cap)
    if positions is None:
        return x, y, len(y)
    index = torch.as_tensor(positions)
    return x[index], y[index], len(y)


def suite_request(run: Path | str, data: Path | str | None, attacks: list[str], clients: str = "all",
                  overrides: list[str] | None = None, max_per_client: int | None = None) -> dict:
    """What a suite evaluation was asked for (saved beside it, so a rerun can tell it is done),
    with the U-Net the run's defended evaluation used (phase 4's, once it has one)."""
    summary = Path(run) / SUMMARY
    request = {"run": str(Path(run).resolve()), "data": None if data is None else str(Path(data).resolve()),
               "attacks": list(attacks), "clients": str(clients), "overrides": list(overrides or []),
               "max_per_client": max_per_client}
    saved = read_json(summary) if summary.is_file() else {}
    purifier = saved.get("purifier") if isinstance(saved, dict) else None
    return {**request, "purifier": purifier} if purifier else request


def current_purifier(evaluation: Path | str, run: Path | str) -> bool:
    """Whether a suite evaluation (its folder) was made with the U-Net the run's defended evaluation
    now uses (phase 4's, once the run has one): an evaluation of a replaced purifier is stale."""
    saved = [Path(evaluation) / "request.json", Path(run) / SUMMARY]
    made, now = (read_json(f) if f.is_file() else {} for f in saved)
    return (made.get("purifier") if isinstance(made, dict) else None) == (now.get("purifier") if isinstance(
        now, dict) else None)


def with_strongest(attacks: list[str], suite: Path | str) -> list[str]:
    """`attacks` and, after them where it is not among them, the strongest attack of the finished suite
    evaluation in folder `suite` (its headline's): what the headline runs on more scans, so that it
    never reports a weaker attack than the suite found. `attacks` alone where there is no such suite."""
    path = Path(suite) / "evaluation.json"
    strongest = Headline.from_dict(read_json(path)["headline"]).attack if path.is_file() else None
    same = {parse_attack_name(a) for a in attacks}
    return list(attacks) + ([strongest] if strongest and parse_attack_name(strongest) not in same else [])


def suite_done(out: Path | str, request: dict) -> bool:
    """Whether `out` holds a finished suite evaluation of exactly this request. A run folder's own
    evaluations (inside it) stay its own when the folder is moved or copied: there the run's path
    saved with them is not compared."""
    out = Path(out)
    saved = out / "request.json"
    if not ((out / "evaluation.json").is_file() and saved.is_file()):
        return False
    return _as_asked_here(out, read_json(saved), request) == request


def _as_asked_here(out: Path, made, request: dict):
    """A request saved in `out`, with the run's path of `request` where `out` is inside that run (a run
    folder's own evaluations stay its own when the folder is moved or copied)."""
    if isinstance(made, dict) and out.resolve().is_relative_to(request["run"]):
        return {**made, "run": request["run"]}
    return made


def evaluate_suite(run: Path | str, data: Path | str | None, attacks: list[str], clients: str = "all",
                   overrides: list[str] | None = None, out: Path | str | None = None,
                   max_per_client: int | None = None, progress: bool = True) -> dict:
    if max_per_client is not None and max_per_client < 1:
        raise ValueError("--max-per-client must be at least 1")
    request = suite_request(run, data, attacks, clients, overrides, max_per_client)
    r = open_run(run, data, clients, overrides, progress)
    cfg = r.cfg
    scans = {i: _client_scans(r, i, max_per_client) for i in r.loaders}
    if not sum(len(s[1]) for s in scans.values()):
        raise ValueError(f"no scans to attack in {r.data_label}")
    # in model calls, so that the time it promises holds when a 1-step attack is followed by a 200-step one
    total = sum(len(s[1]) for s in scans.values()) * sum(attack_cost(a, cfg.attack) for a in attacks)
    bar = tqdm(total=total, desc="attack suite (model calls)", unit="call", unit_scale=True, disable=not progress)
    per_client: list[dict] = []
    device = torch.device(cfg.device)
    target_dir = Path(out) if out else r.default_out("-suite")
    try:
        for i, (x, y, n_split) in scans.items():
            bar.set_postfix(client=i)
            done = _finished_client(target_dir, i, request)
            if done is not None and set(done["results"]) >= {"clean", *attacks}:  # resumes hospital by hospital
                per_client.append(done)
                bar.update(len(y) * sum(attack_cost(a, cfg.attack) for a in attacks))
                continue
            model = r.model(i)
            if cfg.attack.channels_last:
                channels_last(model, *([r.diffusion] if r.defended else []))
            target = r.defended_model(i, model) if r.defended else model
            seed = task.client_seed(cfg, i, purpose="suite")
            results = run_suite(target, x.to(device), y.to(device), attacks, cfg.attack, seed,
                                batch=cfg.attack.batch_size, on_batch=bar.update,
                                earlier=done["results"] if done is not None else None)
            if len(y) < n_split and "clean (whole split)" not in results:  # clean answers on the whole split too
                xs, ys = zip(*r.loaders[i])
                correct = answer(target, torch.cat(xs).to(device), torch.cat(ys).to(device), cfg.attack.draws)
                results["clean (whole split)"] = {"tally": Tally.from_draws(correct.cpu())}
            per_client.append({"client": i, "results": results, "scan_ids": scan_ids(x)})
            _save_client(target_dir, per_client[-1], request)
    finally:
        bar.close()
    result = _summarize(r, attacks, per_client, max_per_client)
    write_json(target_dir / "evaluation.json", result)
    write_csv(target_dir / "evaluation.csv", result["rows"])
    atomic_write_text(target_dir / "evaluation.md", suite_markdown(result))
    plot_suite(result, target_dir / "robustness.png")
    write_json(target_dir / "request.json", request)  # last: marks the evaluation finished
    result["out"] = str(target_dir)
    return result


def _client_file(out: Path, client: int) -> Path:
    return out / "clients" / f"{client}.json"


def _save_client(out: Path, done: dict, request: dict) -> None:
    """One hospital's finished results, kept with the request they answer (so a rerun resumes)."""
    results = {name: {**res, "tally": asdict(res["tally"])} for name, res in done["results"].items()}
    write_json(_client_file(out, done["client"]), {"request": request, **done, "results": results})


def _finished_client(out: Path, client: int, request: dict) -> dict | None:
    """A hospital's results saved by an earlier, interrupted run of this very request, or of the same
    request with fewer attacks (a prefix of its list: each attack's seed is its place in the list, so
    those results are what this request would make), or None."""
    path = _client_file(out, client)
    saved = read_json(path) if path.is_file() else None
    made = _as_asked_here(out, saved.get("request"), request) if isinstance(saved, dict) else None
    if not isinstance(made, dict) or {**made, "attacks": None} != {**request, "attacks": None}:
        return None
    if made["attacks"] != request["attacks"][:len(made["attacks"])]:
        return None
    results = {name: {**res, "tally": Tally(**res["tally"])} for name, res in saved["results"].items()}
    return {"client": saved["client"], "results": results, "scan_ids": saved["scan_ids"]}


def _summarize(r: RunUnderTest, attacks: list[str], per_client: list[dict], cap: int | None) -> dict:
    cfg = r.cfg
    rows = []
    names = [n for n in ("clean", "clean (whole split)", *attacks) if n in per_client[0]["results"]]
    pooled: dict[str, dict] = {}
    for name in names:
        tally, seconds, flagged, bare, linf, latency = Tally(), 0.0, [], 0, 0.0, 0.0
        for c in per_client:
            res = c["results"][name]
            t = res["tally"]
            tally = tally + t
            rows.append({"client": c["client"], "attack": name, **t.rates(),
                         "flagged": res.get("flagged"), "bare_acc": res["bare_correct"] / t.n if "bare_correct" in res
                         else None, "seconds_per_scan": res.get("seconds_per_scan")})
            seconds += res.get("seconds_per_scan", 0.0) * t.n
            latency += (res.get("latency_ms") or 0.0) * t.n
            bare += res.get("bare_correct", 0)
            if res.get("flagged") is not None:
                flagged.append((res["flagged"], t.n))
            linf = max(linf, res.get("linf", 0.0))
        first = per_client[0]["results"][name]
        mean = {"client": "all", "attack": name, **tally.rates(),
                "flagged": sum(f * n for f, n in flagged) / sum(n for _, n in flagged) if flagged else None,
                "bare_acc": bare / tally.n if "bare_correct" in first else None,
                "seconds_per_scan": seconds / tally.n if "seconds_per_scan" in first else None,
                "latency_ms": latency / tally.n if first.get("latency_ms") is not None else None}
        rows.append(mean)
        spec = ATTACKS.get(parse_attack_name(name)[0])  # None for clean
        knows = spec.knows if spec is not None else ""
        if first.get("same_as"):
            knows = f"= {first['same_as']} (no defense to know)"
        outcomes = ({v: "".join(c["results"][name]["outcomes"][v] for c in per_client) for v in VERDICTS}
                    if "outcomes" in first else None)  # per scan, in the order of `scans` below
        pooled[name] = AttackResult(**mean, settings=first.get("settings"), draws=first.get("draws"), max_linf=linf,
                                    knows_the_defense=knows, outcomes=outcomes).to_dict()
    convergence = []  # each attack run at its own budget beside the same attack at the suite's
    for name in attacks:
        base, loss, budget = parse_attack_name(name)
        usual = base + (f":{loss}" if loss else "")
        if budget is not None and usual in pooled:
            weak, strong = pooled[usual], pooled[name]
            paired = {}
            if weak.get("outcomes") and strong.get("outcomes"):  # the same scans, in the same order
                test = mcnemar(weak["outcomes"]["first"], strong["outcomes"]["first"])
                paired = {"only_stronger": test["only_a"], "only_usual": test["only_b"], "p_value": test["p_value"]}
            convergence.append(Convergence(attack=usual, stronger=name, first=weak["first"], first_ci=weak["first_ci"],
                                           stronger_first=strong["first"], stronger_first_ci=strong["first_ci"],
                                           lower_beyond_interval=strong["first"] < weak["first_ci"][0],
                                           n=strong["n"], **paired).to_dict())
    d = cfg.defense
    return {"run": str(r.run), "data": r.data_label, "clients": [c["client"] for c in per_client],
            "max_per_client": cap, "defended": r.defended,
            "defense": ({"detector": d.detector, "mode": d.mode, "rule": d.rule, "target_fpr": d.target_fpr,
                         "t_min": d.t_min, "t_max": d.t_max, "sampler": d.sampler, "sampler_steps": d.sampler_steps,
                         "votes": d.votes} if r.defended else None),
            "attack_config": asdict(cfg.attack), "attacks": attacks, "suite": pooled,
            "scans": {"client": [c["client"] for c in per_client for _ in c["scan_ids"]],
                      "id": [s for c in per_client for s in c["scan_ids"]]},
            "convergence": convergence,
            "headline": headline_of(attacks, pooled).to_dict(), "rows": rows}


def headline_of(attacks: list[str], suite: dict) -> Headline:
    """The lowest first-draw accuracy over `attacks` that know the defense (all of them where none
    does), from a suite's pooled results (`evaluation.json`'s `suite`)."""
    adaptive = [a for a in attacks if base_attack(a).adaptive] or list(attacks)
    name = min(adaptive, key=lambda a: suite[a]["first"])
    r = AttackResult.from_dict(suite[name])
    return Headline(attack=name, first=r.first, first_ci=r.first_ci, n=r.n, settings=r.settings)


def worst_of_n_attack(attacks: list[str], suite: dict, strongest: str | None = None) -> str:
    """The attack, of those that know the defense (all where none does), whose worst of the N answers is
    lowest (`strongest`, the first-draw headline's attack, where none has a worst-of-N figure or they tie)."""
    adaptive = [a for a in attacks if base_attack(a).adaptive] or list(attacks)
    strongest = strongest or headline_of(attacks, suite).attack
    scored = [a for a in adaptive if suite[a].get("worst") is not None]
    return min(scored, key=lambda a: (suite[a]["worst"], a != strongest), default=strongest)


def paired_test(a: dict, b: dict, attack: str, against: str, verdict: str = "first") -> PairedTest:
    """McNemar's exact test of evaluation `b` against `a` under `attack` (`verdict` answers), on
    the same scans; the reason instead where the two cannot be paired."""
    out = {"against": against, "attack": attack, "verdict": verdict}
    outcomes = [ev["suite"].get(attack, {}).get("outcomes") for ev in (a, b)]
    if not all(outcomes):
        return PairedTest(**out, unavailable="no per-scan outcomes under that attack (an evaluation made before "
                                             "they were kept: run it again)")
    if a.get("scans", {}).get("id") != b.get("scans", {}).get("id"):
        return PairedTest(**out, unavailable="not the same scans")
    test = mcnemar(outcomes[0][verdict], outcomes[1][verdict])
    return PairedTest(**out, **test, beats=test["b_correct"] > test["a_correct"] and test["p_value"] < 0.05)


def budget_label(settings: dict | None) -> str:
    """'50 steps x 4 draws, ce' / '1000 queries' / '7 steps' from an attack's describe()."""
    if not settings or settings.get("attack") == "none":
        return ""
    if "queries" in settings:
        return f"{settings['queries']} queries"
    eot = f" x {settings['eot']} draws" if settings.get("eot", 1) > 1 else ""
    return f"{settings['steps']} steps{eot}, {settings.get('loss', 'ce')}"


def suite_markdown(result: dict) -> str:
    a = result["attack_config"]
    lines = [f"# Attack suite: {result['run']} on {result['data']}", ""]
    if result["defense"]:
        d = result["defense"]
        lines.append(f"Defense: {d['mode']} mode, {d['detector']} detector ({d['rule']} rule, {d['target_fpr']:g} "
                     f"FPR), t* in [{d['t_min']}, {d['t_max']}], {d['sampler']} x {d['sampler_steps']}, "
                     f"{d['votes']} purification(s) per answer.")
    else:
        lines.append("No defense in this run: every gradient attack is white-box PGD on the classifier.")
    lines += [f"Budget: {a['norm']} eps {a['eps']:g}, step {a['alpha']:g}. Clients: {len(result['clients'])}, "
              f"at most {result['max_per_client'] or 'all'} scans each. Each attacked scan is answered "
              f"{a['draws']} times with fresh purification noise (once by a deterministic model); 95% "
              "Clopper-Pearson intervals.", ""]
    rows = []
    for name, p in ((name, AttackResult.from_dict(p)) for name, p in result["suite"].items()):
        seconds = None if p.seconds_per_scan is None else f"{p.seconds_per_scan:.2f}"
        rows.append([name, p.knows_the_defense, budget_label(p.settings), p.n, with_interval(p.first, p.first_ci),
                     with_interval(p.majority, p.majority_ci), with_interval(p.worst, p.worst_ci), percent(p.flagged),
                     percent(p.bare_acc), seconds])
    lines.append(table(["attack", "knows the defense", "budget", "scans", "first draw [95% CI]", "majority [CI]",
                        "worst of N [CI]", "flagged", "bare classifier", "s / scan"], rows))
    h = Headline.from_dict(result["headline"])
    lines += ["", f"**Headline (lowest first-draw accuracy over the attacks run): {percent(h.first)}% "
                  f"[{percent(h.first_ci[0])}, {percent(h.first_ci[1])}] under {h.label(budget_label(h.settings))}.**",
              ""]
    lines += convergence_lines(result.get("convergence", []))
    return "\n".join(lines)


def convergence_lines(convergence: list[dict]) -> list[str]:
    """Each attack at its own stronger budget against the same attack at the suite's, in words."""
    lines = []
    for c in map(Convergence.from_dict, convergence):
        verdict = ("lower beyond the interval: the budget has not converged, and the headline takes the stronger one"
                   if c.lower_beyond_interval else "within the interval: the suite's budget has converged")
        paired = (f" ({c.only_stronger} scans fooled only at the stronger budget, {c.only_usual} only at the "
                  f"usual one, McNemar's exact p = {c.p_value:.3g})" if c.p_value is not None else "")
        lines += [f"Convergence: {c.stronger} {percent(c.stronger_first)}% against {c.attack} "
                  f"{percent(c.first)}% [{percent(c.first_ci[0])}, {percent(c.first_ci[1])}] on the same scans"
                  f"{paired}: {verdict}.", ""]
    return lines


__all__ = ["OWN_TEST_EVALUATIONS", "SUITE", "evaluate_suite", "headline_of", "paired_test", "suite_markdown",
           "with_strongest", "worst_of_n_attack"]
