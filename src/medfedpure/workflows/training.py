"""Train into a run folder: as Flower simulations on this machine, or, given a deployment's
`(grid, context)`, inside a ServerApp on Flower's deployment runtime (`workflows.deployment`).
The same ServerApp and ClientApp code runs both ways.

Phases 1-2 (`run_pretraining`): the diffusion U-Net and the MAE, FedAvg of the whole model
(or pooled, `defense.training=central`). Phase 3 (`run_federated`): the method's classifier,
evaluated every round, then the defended evaluation on every client when the folder holds
the two defense models. Phase 4 (`run_purifier`, where `defense.purifier.rounds` > 0): the
U-Net fine-tuned against each hospital's classifier, FedAvg; the defended evaluation then runs
with it (`run_federated` again: its rounds are done, so only the evaluation runs). Every
finished round is checkpointed, so a killed run resumes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid
from tqdm.auto import tqdm

from medfedpure.attacks import pgd_label
from medfedpure.config import MEAN, ExperimentConfig
from medfedpure.data import describe_splits, make_loader
from medfedpure.data.datasets import default_cache_dir, files_digest
from medfedpure.defense.trainer import PHASES, eval_loss, train_epochs
from medfedpure.federation.client_app import app as client_app
from medfedpure.federation.server_app import make_pretrain_server_app, make_server_app, make_strategy, privacy_for
from medfedpure.federation.simulation import flower_environment, run_flower
from medfedpure.federation.strategy import FederationError, PretrainFedAvg, PurifierFedAvg
from medfedpure.methods import fingerprint, method_of, new_model, private_phases, purifier_tag, task
from medfedpure.reporting import environment_info, mean_rows, plot_convergence, round_rows
from medfedpure.reporting.results import defense_rows
from medfedpure.runfolder import (CHECKPOINTS, CONFIG, EXPERTS, PARTITION, PURIFIER, SUMMARY, ResumeError, evaluation_files,
                                  keep_earlier, load_round, need, purifier_weights, save_round)
from medfedpure.storage import load_tensors, read_json, save_tensors, write_csv, write_json

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    out_dir: Path
    rows: list[dict]
    final: dict
    wall_time_s: float
    history: dict[int, dict] = field(repr=False, default_factory=dict)
    defense: list[dict] = field(default_factory=list)


Deployment = tuple[Grid, Context]  # a ServerApp's grid and context on Flower's deployment runtime


def prepare_run(cfg: ExperimentConfig, out_dir: str | Path, tag: str = "", progress: bool = True,
                local_data: bool = True) -> Path:
    """Validate, load and split the data once (bad data fails here, clearly), write the run's metadata.
    A deployment's server has no scans (`local_data=False`): each hospital checks its own."""
    flower_environment()
    cfg.validate()
    out = Path(out_dir).resolve()
    if not local_data:
        if not cfg.data.classes:
            raise ValueError("data.classes: a deployment's server has no scans, so the config must name the "
                             "federation's classes (e.g. data.classes=[no,yes])")
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / f"config{tag}.json", cfg.to_dict())
        write_json(out / f"environment{tag}.json", environment_info(cfg.seed))
        return out
    if cfg.data.cache_dir is None:  # Ray workers must find the same decoded-image cache
        cfg.data.cache_dir = str(default_cache_dir())
    data, splits = task.data_and_splits(cfg, progress=progress)  # a refusal here writes nothing
    sizes = describe_splits(splits, data.labels, len(data.classes))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"config{tag}.json", cfg.to_dict())
    write_json(out / f"environment{tag}.json", environment_info(cfg.seed))
    write_json(out / PARTITION, {"classes": list(data.classes), "source": data.source,
                                        "files_sha256": files_digest(data), "clients": sizes})
    log.info("%d clients, n_i (train) = %s, n_i (test) = %s", len(splits),
             [s["n_train"] for s in sizes], [s["n_test"] for s in sizes])
    return out


def _run_flower(server_app, cfg: ExperimentConfig, flower_log_level: int, deployment: Deployment | None) -> None:
    """The simulation on this machine, or the deployment's own grid."""
    if deployment is None:
        run_flower(server_app, client_app, cfg, flower_log_level)
    else:
        server_app(*deployment)


def _privacy_spent(released: list[dict], cfg: ExperimentConfig, phase: str) -> dict:
    """{"privacy": ...}: what a phase's releases under differential privacy have spent by its last
    round, per hospital (the epsilon of every private phase so far: `federation.dp_pretraining`
    puts phases 1, 2 and 4 in the same budget as phase 3), or {} for a phase without privacy."""
    if not released:
        return {}
    phases = private_phases(cfg)
    order = list(phases)
    phases = {k: phases[k] for k in order[:order.index(phase) + 1]}  # the phases this epsilon covers
    return {"privacy": {**released[-1], "rounds": len(released),
                        **({"phases": phases} if list(phases) != ["train"] else {}),
                        "unit": "a hospital (client-level DP of the models it sends)"}}


class TrainingClock:
    """A phase's training seconds over every process that worked on it: a resumed run starts from what
    its round checkpoint recorded (None where an older checkpoint recorded nothing: then unknown), so
    a run spread over sessions reports its whole training, and not what followed its last round (the
    defended evaluation, timed apart)."""

    KEY = "training_s"

    def __init__(self, resumed=None) -> None:
        self.start = time.time()
        self.base = 0.0 if resumed is None else resumed.state.get(self.KEY)
        self.trained: float | None = self.base  # at the end of the last round this process finished
        self.last_round_end = self.start

    def round_end(self) -> float | None:
        """The training seconds so far (what the round checkpoint keeps)."""
        self.last_round_end = time.time()
        self.trained = None if self.base is None else round(self.base + self.last_round_end - self.start, 1)
        return self.trained

    def since_last_round(self) -> float:
        return round(time.time() - self.last_round_end, 1)

    def summary(self) -> dict:
        """What a phase's summary keeps: its training seconds, where they are known."""
        return {} if self.trained is None else {self.KEY: self.trained}


# --------------------------------------------------------------------------- phases 1-2
def run_pretraining(cfg: ExperimentConfig, phase_name: str, out_dir: str | Path, progress: bool = True,
                    flower_log_level: int = logging.ERROR, deployment: Deployment | None = None) -> dict:
    """Train the MAE or the diffusion U-Net on clean scans; writes `<phase>.safetensors` and its metrics."""
    phase = PHASES[phase_name]
    resumed = load_round(Path(out_dir).resolve(), phase_name, fingerprint(cfg.validate(), phase_name))
    out = prepare_run(cfg, out_dir, tag=f"-{phase_name}", progress=progress,  # after the refusal: nothing written
                      local_data=deployment is None)
    settings = phase.settings(cfg)
    t0, clock = time.time(), TrainingClock(resumed)
    task.set_seed(cfg.seed)
    model = phase.build(cfg).to(cfg.device)
    rows: list[dict] = list(resumed.state["rows"]) if resumed else []
    if resumed is not None:
        model.load_state_dict(resumed.arrays)
        log.info("resuming %s after round %d (checkpoints/%s.json)", phase_name, resumed.round, phase_name)
    metrics_path = out / f"{phase_name}_metrics.json"

    def record(row: dict, state: dict) -> None:
        rows.append(row)
        save_round(out, phase_name, fingerprint(cfg, phase_name), row["round"], state,
                   {"rows": rows, clock.KEY: clock.round_end()})
        write_json(metrics_path, {"phase": phase_name, "training": cfg.defense.training, "rows": rows})

    if cfg.defense.training == "central":
        if deployment is not None:
            raise ValueError("defense.training=central pools every hospital's scans: on a deployment use "
                             "defense.training=federated")
        _pretrain_central(cfg, phase, model, settings, len(rows), record, progress)
    else:
        _pretrain_federated(cfg, phase_name, model, settings, rows, record, progress, flower_log_level, deployment)
    wall = time.time() - t0
    save_tensors(out / CHECKPOINTS[phase_name], model.state_dict(),
                 {"phase": phase_name, "config": cfg.to_json(), "wall_time_s": f"{wall:.1f}",
                  "fingerprint": fingerprint(cfg, phase_name)})
    summary = {"phase": phase_name, "training": cfg.defense.training, "rows": rows, "wall_time_s": round(wall, 1),
               **clock.summary(), "fingerprint": fingerprint(cfg, phase_name),
               **_privacy_spent([r["dp"] for r in rows if "dp" in r], cfg, phase_name)}
    write_json(metrics_path, summary)
    return summary


def _pretrain_federated(cfg: ExperimentConfig, phase_name: str, model, settings, rows: list[dict], record,
                        progress: bool, flower_log_level: int, deployment: Deployment | None,
                        experts: ArrayRecord | None = None, out: Path | None = None) -> None:
    """FedAvg of the whole model over the clients' scans, one checkpoint per round (phase 4: with the
    phase-3 `experts` beside it, and the run folder `out` where each hospital keeps its gate)."""
    bar = tqdm(total=settings.rounds, initial=len(rows), desc=f"{phase_name} rounds", unit="round",
               disable=not progress)

    def on_round_end(rnd: int, row: dict) -> None:
        record(dict(row), strategy.latest_arrays.to_torch_state_dict())
        bar.set_postfix(train=f"{row.get('train_loss', float('nan')):.4f}",
                        test=f"{row.get('test_loss') or float('nan'):.4f}")
        bar.update(1)

    final: list[ArrayRecord] = []
    options = {"round_offset": len(rows), "min_fit_fraction": cfg.federation.min_fit_fraction,
               "rejoin_wait_s": cfg.federation.rejoin_wait_s, "privacy": privacy_for(cfg, phase_name), "done": rows}
    strategy = (PretrainFedAvg(cfg.data.num_clients, on_round_end, **options) if experts is None
                else PurifierFedAvg(cfg.data.num_clients, on_round_end, experts, **options))
    server_app = make_pretrain_server_app(cfg, phase_name, ArrayRecord(model.state_dict()), strategy,
                                          settings.rounds, final.append, None if out is None else str(out))
    try:
        _run_flower(server_app, cfg, flower_log_level, deployment)
    finally:
        bar.close()
    if not final or len(rows) < settings.rounds:
        raise RuntimeError(f"{phase_name} pretraining stopped after {len(rows)} of {settings.rounds} rounds")
    model.load_state_dict(final[0].to_torch_state_dict())


def _pretrain_central(cfg: ExperimentConfig, phase, model, settings, done: int, record, progress: bool) -> None:
    """The paper's setting: every client's training scans pooled on one machine (an epoch a 'round')."""
    data, splits = task.data_and_splits(cfg)
    train_idx = torch.cat([torch.from_numpy(s.train_idx) for s in splits]).numpy()
    test_idx = torch.cat([torch.from_numpy(s.test_idx) for s in splits]).numpy()
    test = make_loader(data, test_idx, 64, train=False)
    epochs = settings.rounds * settings.local_epochs
    for epoch in tqdm(range(done + 1, epochs + 1), initial=done, total=epochs,
                      desc=f"{phase.name} epochs (central)", disable=not progress):
        train = make_loader(data, train_idx, settings.batch_size, train=True, seed=cfg.seed + epoch,
                            augment=cfg.data.training_augmentation)
        loss = train_epochs(phase, model, train, 1, settings.lr, cfg.device, seed=cfg.seed + epoch)
        record({"round": epoch, "train_loss": loss, "test_loss": eval_loss(phase, model, test, cfg.device)},
               model.state_dict())


# --------------------------------------------------------------------------- phase 4
def run_purifier(cfg: ExperimentConfig, out_dir: str | Path, progress: bool = True,
                 flower_log_level: int = logging.ERROR, deployment: Deployment | None = None) -> dict:
    """Fine-tune phase 1's U-Net against every hospital's phase-3 classifier (`defense.purifier`),
    FedAvg; writes `purifier.safetensors` and `purifier_metrics.json`. Phase 3 must be done."""
    cfg = method_of(cfg).configure(cfg).validate()
    out = Path(out_dir).resolve()
    settings = cfg.defense.purifier
    if settings.rounds < 1 or not method_of(cfg).defended:
        raise ValueError("defense.purifier.rounds is 0 (or the method has no defense): there is no phase 4 to run")
    experts = ArrayRecord(load_tensors(need(out / EXPERTS, "phase 3's experts")))
    unet = need(out / CHECKPOINTS["diffusion"], "phase 1's U-Net")
    run = fingerprint(cfg, "purifier")
    try:
        resumed = load_round(out, "purifier", run)
    except ResumeError as err:  # phase 3 stays: name only phase 4's files
        raise ResumeError(f"'{out}' holds a phase 4 made with other defense.purifier settings (or another phase 3); "
                          f"delete {out / 'checkpoints' / 'purifier.json'}, {out / 'checkpoints' / 'purifier.safetensors'} "
                          f"and {out / PURIFIER} to redo phase 4 (copy the folder first to keep both)") from err
    t0, clock = time.time(), TrainingClock(resumed)
    task.set_seed(cfg.seed)
    model = PHASES["diffusion"].build(cfg).to(cfg.device)
    model.load_state_dict(resumed.arrays if resumed is not None else load_tensors(unet))
    rows: list[dict] = list(resumed.state["rows"]) if resumed else []
    metrics_path = out / "purifier_metrics.json"

    def record(row: dict, state: dict) -> None:
        rows.append(row)
        save_round(out, "purifier", run, row["round"], state, {"rows": rows, clock.KEY: clock.round_end()})
        write_json(metrics_path, {"phase": "purifier", "rows": rows})

    _pretrain_federated(cfg, "purifier", model, settings, rows, record, progress, flower_log_level, deployment,
                        experts=experts, out=out)
    wall = time.time() - t0
    save_tensors(out / PURIFIER, model.state_dict(), {"phase": "purifier", "config": cfg.to_json(),
                                                      "wall_time_s": f"{wall:.1f}", "fingerprint": run})
    summary = {"phase": "purifier", "rows": rows, "wall_time_s": round(wall, 1), **clock.summary(), "fingerprint": run,
               **_privacy_spent([r["dp"] for r in rows if "dp" in r], cfg, "purifier")}
    write_json(metrics_path, summary)
    return summary


# --------------------------------------------------------------------------- phase 3
def run_federated(cfg: ExperimentConfig, out_dir: str | Path, keep_client_arrays: bool = False,
                  progress: bool = True, flower_log_level: int = logging.ERROR,
                  deployment: Deployment | None = None) -> RunResult:
    """Train the method's classifier with Flower, evaluate every round, then (if the folder holds the
    MAE and diffusion checkpoints and the method runs the defense) the defended evaluation."""
    cfg, defense_models = _phase3_config(cfg, Path(out_dir).resolve())
    resumed = load_round(Path(out_dir).resolve(), "train", fingerprint(cfg, "train"))  # refuse before writing
    finished = resumed is not None and resumed.round >= cfg.train.rounds  # only the evaluation runs now
    earlier = evaluation_files(Path(out_dir).resolve()) if finished else {}
    trained = _earlier_training_s(Path(out_dir).resolve(), cfg) if finished else None
    out = prepare_run(cfg, out_dir, progress=progress, local_data=deployment is None)
    if _config_changed(earlier.get(CONFIG), cfg):  # an evaluation-only change: keep what it replaces
        log.info("the training is done and only the evaluation changed: re-evaluating in place; the earlier "
                 "evaluation's files are kept in %s", keep_earlier(out, earlier))
    t0 = time.time()
    task.set_seed(cfg.seed)
    model = new_model(cfg, task.num_classes(cfg), init_seed=cfg.seed)
    log.info("%s backbones start from %s", cfg.model.backbone,
             f"ImageNet weights ({cfg.model.pretrained_weights})" if cfg.model.pretrained_weights
             else "random init (no pretrained weights given)")
    if resumed is not None:
        model.load_experts(resumed.arrays)
        log.info("resuming after round %d of %d (checkpoints/train.json)", resumed.round, cfg.train.rounds)
    run_defense = cfg.defense.enabled and {"mae", "purifier"} <= set(defense_models)
    if cfg.defense.enabled and not {"mae", "diffusion"} <= set(defense_models):
        log.warning("no defended evaluation: %s lacks %s (run pretrain-diffusion and pretrain-mae with the same "
                    "--out first)", out, " and ".join(CHECKPOINTS.values()))
    elif cfg.defense.enabled and not run_defense:
        log.info("the defended evaluation waits for phase 4 (%s): `medfedpure experiment` runs it next",
                 out / PURIFIER)
    clock = TrainingClock(resumed)
    strategy, final_arrays, defense_results = _federate(cfg, out, model, resumed, defense_models, run_defense,
                                                        keep_client_arrays, progress, flower_log_level, deployment,
                                                        clock)
    if not final_arrays or len(strategy.history) < cfg.train.rounds:
        raise FederationError(f"the federation stopped after {len(strategy.history)} of {cfg.train.rounds} rounds; "
                              "see the Flower log above")
    if run_defense and not defense_results:  # never a summary without its defense
        raise FederationError("the defended evaluation got no answer; see the Flower log above")
    model.load_experts(final_arrays[0].to_torch_state_dict())
    seconds = time.time() - t0
    timing = {clock.KEY: clock.trained, "defended_evaluation_s": clock.since_last_round() if run_defense else None}
    if trained is not None:  # only the evaluation ran now: the run's wall time stays its training's
        return _write_results(cfg, out, model, strategy.history, defense_results, trained, evaluation_s=seconds,
                              timing=timing)
    return _write_results(cfg, out, model, strategy.history, defense_results, seconds, timing=timing)


def _config_changed(earlier: bytes | None, cfg: ExperimentConfig) -> bool:
    """Whether a finished run's config.json (`earlier`, its bytes) asked for something else than
    `cfg`, once read as a config (fields added since it was written take their defaults)."""
    if earlier is None:
        return False
    try:
        return ExperimentConfig.from_dict(json.loads(earlier)).to_dict() != cfg.to_dict()
    except (ValueError, TypeError):  # unreadable: it is replaced, so it is kept
        return True


def _earlier_training_s(out: Path, cfg: ExperimentConfig) -> float | None:
    """The wall time the summary of this same training recorded, if there is one."""
    path = out / SUMMARY
    summary = read_json(path) if path.is_file() else None
    if not isinstance(summary, dict) or summary.get("fingerprint") != fingerprint(cfg, "train"):
        return None
    value = summary.get("final", {}).get("wall_time_s") if isinstance(summary.get("final"), dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def _phase3_config(cfg: ExperimentConfig, out: Path) -> tuple[ExperimentConfig, dict[str, ArrayRecord]]:
    """The config as the method trains it, and the defense models the folder holds (they travel to
    the hospitals with the messages that need them): phases 1-2's, and under `purifier` the U-Net the
    defended evaluation purifies with (phase 4's where the config has one and it is done)."""
    cfg = method_of(cfg).configure(cfg)
    models = {name: ArrayRecord(load_tensors(out / fname)) for name, fname in CHECKPOINTS.items()
              if (out / fname).is_file()}
    purifier = purifier_weights(out, cfg) if "diffusion" in models else None
    if purifier is not None:  # phase 4's only if it was made for this config
        models["purifier"] = ArrayRecord(load_tensors(purifier))
    if cfg.defense.purify_training and "diffusion" not in models:
        log.warning("defense.purify_training is on but %s is missing: the experts train on clean scans only "
                    "(run `medfedpure pretrain-diffusion` with the same --out first)", out / CHECKPOINTS["diffusion"])
        cfg.defense.purify_training = False
        cfg.defense.adv_share = cfg.defense.adv_raw_share = 0.0
        cfg.defense.purifier.rounds = 0  # phase 4 fine-tunes the U-Net the experts were trained through
    return cfg, models


def _federate(cfg: ExperimentConfig, out: Path, model, resumed, defense_models: dict, run_defense: bool,
              keep_client_arrays: bool, progress: bool, flower_log_level: int, deployment: Deployment | None,
              clock: TrainingClock):
    """The Flower run of phase 3: (strategy, final experts, defended evaluation replies)."""
    bar = tqdm(total=cfg.train.rounds, initial=resumed.round if resumed else 0, desc="federated rounds",
               unit="round", disable=not progress)

    def on_round_end(rnd: int, rec: dict) -> None:
        save_round(out, "train", fingerprint(cfg, "train"), rnd, strategy.latest_arrays.to_torch_state_dict(),
                   {"history": history_to_json(strategy.history), clock.KEY: clock.round_end()})
        _write_metrics(out, cfg, strategy.history)
        ev = rec.get("evaluate", {})
        bar.set_postfix(clean=f"{ev.get('clean_acc', float('nan')):.3f}",
                        adv=f"{ev.get('adv_acc', float('nan')):.3f}")
        bar.update(1)
        if rnd == cfg.train.rounds and run_defense:  # its own line, not the finished training bar
            bar.close()
            d = cfg.defense
            log.info("defended evaluation on every hospital: the paper's protocol for %d detector(s) x %d mode(s), "
                     "one query each (no progress bar: the hospitals answer together)",
                     len(d.eval_detectors), len(d.eval_modes))

    final_arrays: list[ArrayRecord] = []
    defense_results: list[dict] = []
    strategy = make_strategy(cfg, on_round_end, keep_client_arrays, round_offset=resumed.round if resumed else 0,
                             history=history_from_json(resumed.state["history"]) if resumed else None,
                             train_extras={"diffusion": defense_models["diffusion"]} if cfg.defense.purify_training
                             else None)
    # the defended evaluation purifies with phase 4's U-Net where the run has one
    defended_with = {"mae": defense_models["mae"], "diffusion": defense_models["purifier"]} if run_defense else None
    server_app = make_server_app(cfg, ArrayRecord(model.expert_state()), str(out), strategy, final_arrays.append,
                                 defended_with, defense_results.extend if run_defense else None)
    try:
        _run_flower(server_app, cfg, flower_log_level, deployment)
    finally:
        bar.close()
    return strategy, final_arrays, defense_results


def _write_metrics(out: Path, cfg: ExperimentConfig, history: dict[int, dict]) -> list[dict]:
    rows = round_rows(history)
    write_json(out / "metrics.json", {"attack": pgd_label(cfg.attack), "rows": rows, "failures": failures(history)})
    write_csv(out / "metrics.csv", rows)
    return rows


def _write_results(cfg: ExperimentConfig, out: Path, model, history: dict[int, dict], defense_results: list[dict],
                   wall: float, evaluation_s: float | None = None, timing: dict | None = None) -> RunResult:
    """The final experts, metrics, summary, defense tables and the convergence figure (`wall`: the
    training's wall time; `evaluation_s`: that of a defended evaluation run again on its own; `timing`:
    the training's seconds over every session (TrainingClock) and the defended evaluation's after it)."""
    save_tensors(out / EXPERTS, model.expert_state(),
                 {"rounds": str(cfg.train.rounds), "backbone": cfg.model.backbone, "config": cfg.to_json(),
                  "fingerprint": fingerprint(cfg, "train")})
    rows = _write_metrics(out, cfg, history)
    final = dict(mean_rows(rows)[-1])
    final["wall_time_s"] = round(wall, 1)
    final.update({k: v for k, v in (timing or {}).items() if v is not None})
    if evaluation_s is not None:
        final["reevaluation_s"] = round(evaluation_s, 1)
    label = pgd_label(cfg.attack)
    summary = {"name": cfg.name, "attack": label, "final": final, "failures": failures(history),
               "fingerprint": fingerprint(cfg, "train"),
               # which U-Net the defended evaluation purified with: phase 4's (its fingerprint) or phase 1's
               "purifier": purifier_tag(cfg) if defense_results else None,
               "clients": [r for r in rows if r["round"] == cfg.train.rounds and r["client"] != "mean"]}
    released = [history[rnd]["dp"] for rnd in sorted(history) if "dp" in history[rnd]]
    summary.update(_privacy_spent(released, cfg, "train"))
    rules = sorted({history[rnd]["aggregation"] for rnd in history if "aggregation" in history[rnd]})
    if rules and rules != [MEAN]:  # a robust rule combined the experts: which, and in how many rounds
        trim = {"trim_fraction": cfg.federation.trim_fraction} if "trimmed-mean" in rules else {}
        summary["aggregation"] = {"rule": ", ".join(rules), "rounds": sum("aggregation" in h for h in history.values()),
                                  **trim}
    if defense_results:
        drows = defense_rows(defense_results, cfg)
        write_json(out / "defense.json", {"attack": label + " (crafted on the classifier)", "rows": drows})
        write_csv(out / "defense.csv", drows)
        summary["defense"] = [r for r in drows if r["client"] == "mean"]
    write_json(out / SUMMARY, summary)
    plot_convergence(rows, out / "accuracy_per_round.png",
                     f"{cfg.name}: {cfg.data.dataset} {cfg.data.image_size}px, {cfg.data.num_clients} clients, "
                     f"K={cfg.model.num_experts} {cfg.model.backbone}", label)
    return RunResult(out, rows, final, wall, history, summary.get("defense", []))


def failures(history: dict[int, dict]) -> list[dict]:
    """Every client that failed a round: round, phase, client (or node) and the last line of its error."""
    return [{"round": rnd, **f} for rnd in sorted(history) for f in history[rnd].get("failed", [])]


def history_to_json(history: dict[int, dict]) -> dict:
    """The strategy's bookkeeping without the arrays kept for audits."""
    skip = {"arrays", "sent_arrays", "aggregated"}
    return {str(rnd): {**{k: v for k, v in rec.items() if k not in skip and k != "clients"},
                       "clients": {str(c): {k: v for k, v in m.items() if k not in skip}
                                   for c, m in rec["clients"].items()}}
            for rnd, rec in history.items()}


def history_from_json(raw: dict) -> dict[int, dict]:
    return {int(rnd): {**rec, "clients": {int(c): m for c, m in rec["clients"].items()}} for rnd, rec in raw.items()}
