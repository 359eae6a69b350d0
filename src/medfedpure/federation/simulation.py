"""Run a federation as a Flower simulation on this machine and write the results folder."""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord
from tqdm.auto import tqdm

from medfedpure.config import ExperimentConfig
from medfedpure.data import describe_splits
from medfedpure.data.datasets import default_cache_dir
from medfedpure.federation import task
from medfedpure.federation.client_app import app as client_app
from medfedpure.federation.server_app import make_server_app, make_strategy
from medfedpure.reporting import environment_info, mean_rows, plot_convergence, round_rows
from medfedpure.storage import save_tensors, write_csv, write_json

log = logging.getLogger(__name__)

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


@dataclass
class RunResult:
    out_dir: Path
    rows: list[dict]
    final: dict
    wall_time_s: float
    history: dict[int, dict] = field(repr=False, default_factory=dict)


def attack_label(cfg: ExperimentConfig) -> str:
    a = cfg.attack
    return f"PGD-{a.norm} eps={a.eps:g} alpha={a.alpha:g} steps={a.steps}"


def run_federated(cfg: ExperimentConfig, out_dir: str | Path, keep_client_arrays: bool = False,
                  progress: bool = True, flower_log_level: int = logging.ERROR) -> RunResult:
    """Train the personalized MoE with Flower (Ray simulation) and write every result atomically."""
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    cfg.validate()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.data.cache_dir is None:  # Ray workers must find the same decoded-image cache
        cfg.data.cache_dir = str(default_cache_dir())
    t0 = time.time()

    # Load and split once here: bad data fails now, with a clear error, and the cache is warm.
    data, splits = task.data_and_splits(cfg)
    sizes = describe_splits(splits, data.labels, len(data.classes))
    write_json(out / "config.json", cfg.to_dict())
    write_json(out / "environment.json", environment_info(cfg.seed))
    write_json(out / "partition.json", {"classes": list(data.classes), "source": data.source, "clients": sizes})
    log.info("%d clients, n_i (train) = %s, n_i (test) = %s", len(splits),
             [s["n_train"] for s in sizes], [s["n_test"] for s in sizes])

    model = task.new_model(cfg, len(data.classes), init_seed=cfg.seed)
    initial = ArrayRecord(model.expert_state())
    bar = tqdm(total=cfg.train.rounds, desc="federated rounds", unit="round", disable=not progress)

    def on_round_end(rnd: int, rec: dict) -> None:
        rows = round_rows(strategy.history)
        write_json(out / "metrics.json", {"attack": attack_label(cfg), "rows": rows})
        write_csv(out / "metrics.csv", rows)
        ev = rec.get("evaluate", {})
        bar.set_postfix(clean=f"{ev.get('clean_acc', float('nan')):.3f}",
                        adv=f"{ev.get('adv_acc', float('nan')):.3f}")
        bar.update(1)

    final_arrays: list[ArrayRecord] = []
    strategy = make_strategy(cfg, on_round_end, keep_client_arrays)
    server_app = make_server_app(cfg, initial, str(out), strategy, final_arrays.append)
    backend_config = {"client_resources": {"num_cpus": cfg.federation.num_cpus_per_client, "num_gpus": 0.0},
                      "init_args": {"num_cpus": max(os.cpu_count() or 1, cfg.federation.num_cpus_per_client),
                                    "include_dashboard": False}}
    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    flwr_logger.setLevel(flower_log_level)
    try:
        from flwr.simulation import run_simulation
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.data.num_clients,
                           backend_name=cfg.federation.backend, backend_config=backend_config)
    finally:
        flwr_logger.setLevel(old_level)
        bar.close()
    if not final_arrays or len(strategy.history) < cfg.train.rounds:
        raise RuntimeError(f"the federation stopped after {len(strategy.history)} of {cfg.train.rounds} rounds; "
                           "see the Flower log above")

    model.load_experts(final_arrays[0].to_torch_state_dict())
    save_tensors(out / "global_experts.safetensors", model.expert_state(),
                 {"rounds": str(cfg.train.rounds), "backbone": cfg.model.backbone})
    rows = round_rows(strategy.history)
    wall = time.time() - t0
    final = dict(mean_rows(rows)[-1])
    final["wall_time_s"] = round(wall, 1)
    write_json(out / "metrics.json", {"attack": attack_label(cfg), "rows": rows})
    write_csv(out / "metrics.csv", rows)
    write_json(out / "summary.json", {"name": cfg.name, "attack": attack_label(cfg), "final": final,
                                      "clients": [r for r in rows if r["round"] == cfg.train.rounds
                                                  and r["client"] != "mean"]})
    plot_convergence(rows, out / "accuracy_per_round.png",
                     f"{cfg.name}: {cfg.data.dataset} {cfg.data.image_size}px, {cfg.data.num_clients} clients, "
                     f"K={cfg.model.num_experts} {cfg.model.backbone}", attack_label(cfg))
    return RunResult(out, rows, final, wall, strategy.history)
