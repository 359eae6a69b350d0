"""Run the federation's phases as Flower simulations on this machine and write the results folder.

Phases 1-2 (`run_pretraining`): the diffusion U-Net and the MAE, FedAvg of the whole model
(or pooled, `defense.training=central`). Phase 3 (`run_federated`): the personalized MoE,
evaluated every round, then the defended evaluation on every client when the folder
holds the two defense checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from tqdm.auto import tqdm

from medfedpure.config import ExperimentConfig
from medfedpure.data import describe_splits, make_loader
from medfedpure.data.datasets import default_cache_dir, files_digest
from medfedpure.defense.trainer import PHASES, eval_loss, train_epochs
from medfedpure.federation import task
from medfedpure.federation.checkpoint import (EVALUATION_ONLY, ResumeError, config_fingerprint, load_round,
                                              save_round)
from medfedpure.federation.client_app import app as client_app
from medfedpure.federation.pretrain_client_app import app as pretrain_client_app
from medfedpure.federation.server_app import (PretrainFedAvg, make_pretrain_server_app, make_server_app,
                                              make_strategy)
from medfedpure.federation.strategy import FederationError
from medfedpure.reporting import environment_info, mean_rows, plot_convergence, round_rows
from medfedpure.reporting.results import defense_rows
from medfedpure.storage import read_json, save_tensors, write_csv, write_json

log = logging.getLogger(__name__)

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
CHECKPOINTS = {"mae": "mae.safetensors", "diffusion": "diffusion.safetensors"}


@dataclass
class RunResult:
    out_dir: Path
    rows: list[dict]
    final: dict
    wall_time_s: float
    history: dict[int, dict] = field(repr=False, default_factory=dict)
    defense: list[dict] = field(default_factory=list)


def attack_label(cfg: ExperimentConfig) -> str:
    a = cfg.attack
    return f"PGD-{a.norm} eps={a.eps:g} alpha={a.alpha:g} steps={a.steps}"


def prepare_run(cfg: ExperimentConfig, out_dir: str | Path, tag: str = "") -> Path:
    """Validate, load and split the data once (bad data fails here, clearly), write the run's metadata."""
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    cfg.validate()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.data.cache_dir is None:  # Ray workers must find the same decoded-image cache
        cfg.data.cache_dir = str(default_cache_dir())
    data, splits = task.data_and_splits(cfg)
    sizes = describe_splits(splits, data.labels, len(data.classes))
    write_json(out / f"config{tag}.json", cfg.to_dict())
    write_json(out / f"environment{tag}.json", environment_info(cfg.seed))
    write_json(out / "partition.json", {"classes": list(data.classes), "source": data.source,
                                        "files_sha256": files_digest(data), "clients": sizes})
    log.info("%d clients, n_i (train) = %s, n_i (test) = %s", len(splits),
             [s["n_train"] for s in sizes], [s["n_test"] for s in sizes])
    return out


class _ClientFailuresInOneLine(logging.Filter):
    """Flower logs a client's exception with the Ray traceback around it (hundreds of lines); the
    strategy already reports each failed client in one line, so these records are dropped unless
    the log level asks for everything (-v)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("ClientAppException" in text or "processing a message by RayBackend" in text)


def run_flower(server_app, client_app_, cfg: ExperimentConfig, flower_log_level: int = logging.ERROR) -> None:
    """A Flower simulation on the Ray backend, one ClientApp at a time on this machine's cores."""
    from flwr.simulation import run_simulation

    backend_config = {"client_resources": {"num_cpus": cfg.federation.num_cpus_per_client,
                                          "num_gpus": cfg.federation.num_gpus_per_client},
                      "init_args": {"num_cpus": max(os.cpu_count() or 1, cfg.federation.num_cpus_per_client),
                                    "include_dashboard": False}}
    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    flwr_logger.setLevel(flower_log_level)
    quiet = _ClientFailuresInOneLine()
    if flower_log_level > logging.INFO:
        flwr_logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # run_simulation's deprecation notice
            run_simulation(server_app=server_app, client_app=client_app_, num_supernodes=cfg.data.num_clients,
                           backend_name=cfg.federation.backend, backend_config=backend_config)
    finally:
        flwr_logger.setLevel(old_level)
        flwr_logger.removeFilter(quiet)


# --------------------------------------------------------------------------- phases 1-2
def run_pretraining(cfg: ExperimentConfig, phase_name: str, out_dir: str | Path, progress: bool = True,
                    flower_log_level: int = logging.ERROR) -> dict:
    """Train the MAE or the diffusion U-Net on clean scans; writes `<phase>.safetensors` and its metrics."""
    phase = PHASES[phase_name]
    resumed = load_round(Path(out_dir).resolve(), phase_name, cfg.validate())  # refuse before writing anything
    out = prepare_run(cfg, out_dir, tag=f"-{phase_name}")
    settings = phase.settings(cfg)
    t0 = time.time()
    task.set_seed(cfg.seed)
    model = phase.build(cfg).to(cfg.device)
    rows: list[dict] = list(resumed.state["rows"]) if resumed else []
    if resumed is not None:
        model.load_state_dict(resumed.arrays)
        log.info("resuming %s after round %d (checkpoints/%s.json)", phase_name, resumed.round, phase_name)
    metrics_path = out / f"{phase_name}_metrics.json"

    def record(row: dict, state: dict) -> None:
        rows.append(row)
        save_round(out, phase_name, cfg, row["round"], state, {"rows": rows})
        write_json(metrics_path, {"phase": phase_name, "training": cfg.defense.training, "rows": rows})

    if cfg.defense.training == "central":
        _pretrain_central(cfg, phase, model, settings, len(rows), record, progress)
    else:
        bar = tqdm(total=settings.rounds, initial=len(rows), desc=f"{phase_name} rounds", unit="round",
                   disable=not progress)

        def on_round_end(rnd: int, row: dict) -> None:
            record(dict(row), strategy.latest_arrays.to_torch_state_dict())
            bar.set_postfix(train=f"{row.get('train_loss', float('nan')):.4f}",
                            test=f"{row.get('test_loss') or float('nan'):.4f}")
            bar.update(1)

        final: list[ArrayRecord] = []
        strategy = PretrainFedAvg(cfg.data.num_clients, on_round_end, round_offset=len(rows),
                                  min_fit_fraction=cfg.federation.min_fit_fraction)
        server_app = make_pretrain_server_app(cfg, phase_name, ArrayRecord(model.state_dict()), strategy,
                                              settings.rounds, final.append)
        try:
            run_flower(server_app, pretrain_client_app, cfg, flower_log_level)
        finally:
            bar.close()
        if not final or len(rows) < settings.rounds:
            raise RuntimeError(f"{phase_name} pretraining stopped after {len(rows)} of {settings.rounds} rounds")
        model.load_state_dict(final[0].to_torch_state_dict())
    wall = time.time() - t0
    save_tensors(out / CHECKPOINTS[phase_name], model.state_dict(),
                 {"phase": phase_name, "config": cfg.to_json(), "wall_time_s": f"{wall:.1f}",
                  "fingerprint": config_fingerprint(cfg, phase_name)})
    summary = {"phase": phase_name, "training": cfg.defense.training, "rows": rows, "wall_time_s": round(wall, 1),
               "fingerprint": config_fingerprint(cfg, phase_name)}
    write_json(metrics_path, summary)
    return summary


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
                            augment=cfg.data.augment)
        loss = train_epochs(phase, model, train, 1, settings.lr, cfg.device, seed=cfg.seed + epoch)
        record({"round": epoch, "train_loss": loss, "test_loss": eval_loss(phase, model, test, cfg.device)},
               model.state_dict())


# --------------------------------------------------------------------------- phase 3
def run_federated(cfg: ExperimentConfig, out_dir: str | Path, keep_client_arrays: bool = False,
                  progress: bool = True, flower_log_level: int = logging.ERROR) -> RunResult:
    """Train the personalized MoE with Flower, evaluate every round, then (if the folder holds the
    MAE and diffusion checkpoints and the defense is enabled) the defended evaluation."""
    if cfg.method.name != "medfedpure":  # the baselines have no defense
        cfg.defense.enabled = False
        cfg.defense.purify_training = False
        cfg.defense.adv_share = 0.0
    defense_paths = _defense_paths(cfg, Path(out_dir).resolve())
    if cfg.defense.purify_training and "diffusion-path" not in defense_paths:
        log.warning("defense.purify_training is on but %s is missing: the experts train on clean scans only "
                    "(run `medfedpure pretrain-diffusion` with the same --out first)",
                    Path(out_dir) / CHECKPOINTS["diffusion"])
        cfg.defense.purify_training = False
        cfg.defense.adv_share = 0.0
    resumed = load_round(Path(out_dir).resolve(), "train", cfg.validate())  # refuse before writing anything
    out = prepare_run(cfg, out_dir)
    t0 = time.time()

    task.set_seed(cfg.seed)
    model = task.new_model(cfg, task.num_classes(cfg), init_seed=cfg.seed)
    log.info("%s backbones start from %s", cfg.model.backbone,
             f"ImageNet weights ({cfg.model.pretrained_weights})" if cfg.model.pretrained_weights
             else "random init (no pretrained weights given)")
    if resumed is not None:
        model.load_experts(resumed.arrays)
        log.info("resuming after round %d of %d (checkpoints/train.json)", resumed.round, cfg.train.rounds)
    initial = ArrayRecord(model.expert_state())
    bar = tqdm(total=cfg.train.rounds, initial=resumed.round if resumed else 0, desc="federated rounds",
               unit="round", disable=not progress)

    def on_round_end(rnd: int, rec: dict) -> None:
        save_round(out, "train", cfg, rnd, strategy.latest_arrays.to_torch_state_dict(),
                   {"history": history_to_json(strategy.history)})
        rows = round_rows(strategy.history)
        write_json(out / "metrics.json", {"attack": attack_label(cfg), "rows": rows,
                                          "failures": failures(strategy.history)})
        write_csv(out / "metrics.csv", rows)
        ev = rec.get("evaluate", {})
        bar.set_postfix(clean=f"{ev.get('clean_acc', float('nan')):.3f}",
                        adv=f"{ev.get('adv_acc', float('nan')):.3f}")
        bar.update(1)
        if rnd == cfg.train.rounds and len(defense_paths) == 2 and cfg.defense.enabled:
            bar.set_description("defended evaluation")

    final_arrays: list[ArrayRecord] = []
    defense_results: list[dict] = []
    strategy = make_strategy(cfg, on_round_end, keep_client_arrays, round_offset=resumed.round if resumed else 0,
                             history=history_from_json(resumed.state["history"]) if resumed else None)
    run_defense = cfg.defense.enabled and len(defense_paths) == 2
    if cfg.defense.enabled and not run_defense:
        log.warning("no defended evaluation: %s lacks %s (run pretrain-diffusion and pretrain-mae with the same "
                    "--out first)", out, " and ".join(CHECKPOINTS.values()))
    server_app = make_server_app(cfg, initial, str(out), strategy, final_arrays.append,
                                 defense_paths if run_defense or cfg.defense.purify_training else None,
                                 defense_results.extend if run_defense else None)
    try:
        run_flower(server_app, client_app, cfg, flower_log_level)
    finally:
        bar.close()
    if not final_arrays or len(strategy.history) < cfg.train.rounds:
        raise FederationError(f"the federation stopped after {len(strategy.history)} of {cfg.train.rounds} rounds; "
                              "see the Flower log above")
    if run_defense and not defense_results:  # never a summary without its defense
        raise FederationError("the defended evaluation got no answer; see the Flower log above")

    model.load_experts(final_arrays[0].to_torch_state_dict())
    save_tensors(out / "global_experts.safetensors", model.expert_state(),
                 {"rounds": str(cfg.train.rounds), "backbone": cfg.model.backbone, "config": cfg.to_json(),
                  "fingerprint": config_fingerprint(cfg, "train")})
    rows = round_rows(strategy.history)
    wall = time.time() - t0
    final = dict(mean_rows(rows)[-1])
    final["wall_time_s"] = round(wall, 1)
    write_json(out / "metrics.json", {"attack": attack_label(cfg), "rows": rows, "failures": failures(strategy.history)})
    write_csv(out / "metrics.csv", rows)
    summary = {"name": cfg.name, "attack": attack_label(cfg), "final": final, "failures": failures(strategy.history),
               "fingerprint": config_fingerprint(cfg, "train"),
               "clients": [r for r in rows if r["round"] == cfg.train.rounds and r["client"] != "mean"]}
    if defense_results:
        drows = defense_rows(defense_results, cfg)
        write_json(out / "defense.json", {"attack": attack_label(cfg) + " (crafted on the classifier)",
                                          "rows": drows})
        write_csv(out / "defense.csv", drows)
        summary["defense"] = [r for r in drows if r["client"] == "mean"]
    write_json(out / "summary.json", summary)
    plot_convergence(rows, out / "accuracy_per_round.png",
                     f"{cfg.name}: {cfg.data.dataset} {cfg.data.image_size}px, {cfg.data.num_clients} clients, "
                     f"K={cfg.model.num_experts} {cfg.model.backbone}", attack_label(cfg))
    return RunResult(out, rows, final, wall, strategy.history, summary.get("defense", []))


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


def _defense_paths(cfg: ExperimentConfig, out: Path) -> dict[str, str]:
    return {f"{name}-path": str(out / fname) for name, fname in CHECKPOINTS.items() if (out / fname).is_file()}


# --------------------------------------------------------------------------- all phases
PHASE_ORDER = ("diffusion", "mae", "train")


def phase_done(cfg: ExperimentConfig, out: Path, phase: str) -> bool:
    """Whether `out` already holds this phase's final result for this config."""
    from safetensors import safe_open

    if phase in CHECKPOINTS:
        path = out / CHECKPOINTS[phase]
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), "pt") as fh:
                return (fh.metadata() or {}).get("fingerprint") == config_fingerprint(cfg, phase)
        except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
            raise ResumeError(f"checkpoint '{path}' is unreadable ({err}); delete it to train that phase "
                              "again") from err
    path = out / "summary.json"
    if not path.is_file():
        return False
    summary = read_json(path)
    return (summary.get("fingerprint") == config_fingerprint(cfg, "train")
            and (not cfg.defense.enabled or "defense" in summary))


def method_config(cfg: ExperimentConfig, method: str) -> ExperimentConfig:
    """The same experiment trained by another method (the baselines have no defense)."""
    mcfg = ExperimentConfig.from_dict(cfg.to_dict())
    mcfg.method.name = method
    if method != "medfedpure":
        mcfg.defense.enabled = False
        mcfg.defense.purify_training = False
        mcfg.defense.adv_share = 0.0
    return mcfg.validate()


def evaluation_overrides(cfg: ExperimentConfig, trained: ExperimentConfig) -> list[str]:
    """`attack.*` and evaluation-only `defense.*` fields where this command's config differs from the
    one the run was trained with (they change no weights, so training is not redone, but the
    evaluations must follow them)."""
    fields = [("attack", f.name) for f in dataclasses.fields(cfg.attack)]
    fields += [("defense", name) for name in EVALUATION_ONLY if name != "enabled"]
    return [f"{section}.{name}={json.dumps(getattr(getattr(cfg, section), name))}" for section, name in fields
            if getattr(getattr(cfg, section), name) != getattr(getattr(trained, section), name)]


def method_dir(out: Path, method: str) -> Path:
    return out if method == "medfedpure" else out / "baselines" / method


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, progress: bool = True,
                   flower_log_level: int = logging.ERROR, methods: list[str] | None = None,
                   transfer: bool = True, suite: bool = True) -> dict:
    """Every phase each method needs, the internal-evasion matrix, the attack suite (`attack.suite`
    on each client's own test split), then the report; finished phases (and rounds, and
    evaluations) are not redone. MedFedPure runs in `out`, a baseline in `out/baselines/<name>`."""
    from medfedpure.evaluation.attack_suite import default_suite_dir, evaluate_suite, suite_done, suite_request
    from medfedpure.evaluation.transfer import transfer_done, transfer_matrix

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings = read_json(out / "timings.json") if (out / "timings.json").is_file() else {}
    for method in methods or [cfg.method.name]:
        mcfg = method_config(cfg, method)
        folder = method_dir(out, method)
        phases = PHASE_ORDER if method == "medfedpure" and mcfg.defense.enabled else ("train",)
        for phase in phases:
            if phase_done(mcfg, folder, phase):
                log.info("%s phase %s: already done in %s, not redone", method, phase, folder)
                continue
            t0 = time.time()
            if phase == "train":
                run_federated(mcfg, folder, progress=progress, flower_log_level=flower_log_level)
            else:
                run_pretraining(mcfg, phase, folder, progress=progress, flower_log_level=flower_log_level)
            timings[phase if method == "medfedpure" else f"train:{method}"] = round(time.time() - t0, 1)
            write_json(out / "timings.json", timings)
        if transfer and not transfer_done(folder, mcfg):
            t0 = time.time()
            transfer_matrix(folder, progress=progress)
            timings[f"transfer:{method}"] = round(time.time() - t0, 1)
            write_json(out / "timings.json", timings)
        if suite and mcfg.attack.suite:
            changed = evaluation_overrides(mcfg, ExperimentConfig.from_dict(read_json(folder / "config.json")))
            request = suite_request(folder, None, mcfg.attack.suite, overrides=changed,
                                    max_per_client=mcfg.attack.suite_max_per_client)
            if not suite_done(default_suite_dir(folder), request):
                t0 = time.time()
                evaluate_suite(folder, None, mcfg.attack.suite, overrides=changed,
                               max_per_client=mcfg.attack.suite_max_per_client, out=default_suite_dir(folder),
                               progress=progress)
                timings[f"suite:{method}"] = round(time.time() - t0, 1)
                write_json(out / "timings.json", timings)
    from medfedpure.reporting.tables import write_report

    return write_report(out)
