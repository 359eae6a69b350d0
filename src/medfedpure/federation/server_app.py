"""Flower ServerApps: FedAvg of the experts (phase 3, then the defended evaluation) and
plain FedAvg of a whole defense model (phases 1-2)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from medfedpure.config import ExperimentConfig
from medfedpure.federation.privacy import Privacy, noise_for_epsilon
from medfedpure.methods import private_phases
from medfedpure.federation.strategy import (ExpertFedAvg, FederationError, PretrainFedAvg, accept_replies,
                                            expert_strategy, needed_answers)

log = logging.getLogger(__name__)


def make_server_app(cfg: ExperimentConfig, initial_experts: ArrayRecord, out_dir: str,
                    strategy: ExpertFedAvg, on_done: Callable[[ArrayRecord], None],
                    defense_models: dict[str, ArrayRecord] | None = None,
                    on_defense: Callable[[list[dict]], None] | None = None) -> ServerApp:
    """Rounds `strategy.round_offset + 1 .. cfg.train.rounds` (all of them unless resuming), then,
    with `defense_models` (the federation's MAE and U-Net) and `on_defense`, the defended evaluation."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = ConfigRecord({"experiment": cfg.to_json(), "out-dir": out_dir})
        _wait_for_hospitals(grid, cfg)
        remaining = cfg.train.rounds - strategy.round_offset
        if remaining > 0:
            strategy.start(grid=grid, initial_arrays=initial_experts, num_rounds=remaining,
                           train_config=config, evaluate_config=ConfigRecord(dict(config)),
                           timeout=cfg.federation.round_timeout_s)
        final = strategy.latest_arrays or initial_experts
        on_done(final)
        if defense_models and on_defense is not None:
            config["server-round"] = cfg.train.rounds  # each hospital's gate as of the last round
            results, failed = _defended_evaluation(grid, final, defense_models, config, cfg, strategy.clients_of)
            # a hospital lost here is named in summary.json's failures, as one lost in a round is
            strategy.record_failures(cfg.train.rounds, "defended evaluation", failed)
            on_defense(results)

    return app


def wait_for_nodes(grid: Grid, count: int, timeout_s: float = 600.0, needed: int | None = None) -> list[int]:
    """The ids of the connected clients once all `count` are there. After `timeout_s` it goes on
    with those connected if they are at least `needed` (default: all), else one clear error. A wait
    says what it waits for, once."""
    deadline = time.monotonic() + timeout_s
    needed = count if needed is None else needed
    announced = False
    while True:
        ids = list(grid.get_node_ids())
        if len(ids) >= count:
            return ids
        if not announced:
            log.info("waiting up to %.0f s for %d more of %d hospitals (%d connected, %d needed)",
                     timeout_s, count - len(ids), count, len(ids), needed)
            announced = True
        if time.monotonic() > deadline:
            if len(ids) >= needed:
                log.warning("%d of %d clients connected within %.0f s; going on without the others",
                            len(ids), count, timeout_s)
                return ids
            raise FederationError(f"only {len(ids)} of {count} clients connected within {timeout_s:.0f} s "
                                  f"({needed} needed; federation.join_timeout_s)")
        time.sleep(0.5)


def _wait_for_hospitals(grid: Grid, cfg: ExperimentConfig, timeout_s: float | None = None) -> list[int]:
    """Before the first round: up to `federation.join_timeout_s`; a federation already running waits
    for a lost hospital as a round does (`timeout_s`, e.g. `federation.rejoin_wait_s`)."""
    return wait_for_nodes(grid, cfg.data.num_clients, cfg.federation.join_timeout_s if timeout_s is None else timeout_s,
                          needed_answers(cfg.data.num_clients, cfg.federation.min_fit_fraction))


def _defended_evaluation(grid: Grid, experts: ArrayRecord, defense_models: dict[str, ArrayRecord],
                         config: ConfigRecord, cfg: ExperimentConfig,
                         clients_of: dict[int, int]) -> tuple[list[dict], list[dict]]:
    """One query to every client: evaluate the final experts with its own gate and defense. The
    hospitals' figures, and a record of each that failed."""
    ExpertFedAvg.check_keys(experts.keys(), "server -> client defense query")
    content = RecordDict({"arrays": experts, "config": config, **defense_models})
    nodes = _wait_for_hospitals(grid, cfg, timeout_s=cfg.federation.rejoin_wait_s)  # not 600 s after training
    messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=node) for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=cfg.federation.round_timeout_s))
    valid, failed = accept_replies(replies, cfg.data.num_clients, cfg.federation.min_fit_fraction,
                                   "defended evaluation", clients_of)
    return [dict(m.content["metrics"]) for m in valid], failed


def privacy_for(cfg: ExperimentConfig, phase: str) -> Privacy | None:
    """The server's side of differential privacy for `phase`'s releases, None where that phase is not
    private: one noise multiplier for every private phase (`federation.dp_epsilon` solved over all
    their rounds together), and an accountant that starts with the rounds of the private phases
    before this one, so each phase reports what the run has spent so far."""
    phases = private_phases(cfg)
    if phase not in phases:
        return None
    fed, order = cfg.federation, list(phases)
    z = fed.dp_noise_multiplier or noise_for_epsilon(fed.dp_epsilon, sum(phases.values()), fed.dp_delta,
                                                     cfg.data.num_clients)
    return Privacy(z, fed.dp_clipping_norm, fed.dp_delta, cfg.data.num_clients, seed=cfg.seed,
                   earlier_rounds=sum(phases[p] for p in order[:order.index(phase)]),
                   stream=0 if phase == "train" else 1 + ("diffusion", "mae", "purifier").index(phase))


def make_strategy(cfg: ExperimentConfig, on_round_end=None, keep_client_arrays: bool = False,
                  round_offset: int = 0, history: dict | None = None,
                  train_extras: dict[str, ArrayRecord] | None = None) -> ExpertFedAvg:
    fed = cfg.federation
    rule = {"beta": fed.trim_fraction} if fed.aggregation == "trimmed-mean" else {}
    return expert_strategy(fed.aggregation)(privacy=privacy_for(cfg, "train"),
        num_rounds=cfg.train.rounds, on_round_end=on_round_end, keep_client_arrays=keep_client_arrays,
        round_offset=round_offset, history=history, num_clients=cfg.data.num_clients,
        min_fit_fraction=fed.min_fit_fraction, rejoin_wait_s=fed.rejoin_wait_s, train_extras=train_extras, **rule)


def make_pretrain_server_app(cfg: ExperimentConfig, phase: str, initial: ArrayRecord, strategy: PretrainFedAvg,
                             rounds: int, on_done: Callable[[ArrayRecord], None],
                             out_dir: str | None = None) -> ServerApp:
    """FedAvg of one whole defense model: phases 1-2, or phase 4 (`strategy` a PurifierFedAvg; `out_dir`
    the run folder, where a simulated hospital keeps its gate)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = ConfigRecord({"experiment": cfg.to_json(), "phase": phase,
                               **({"out-dir": out_dir} if out_dir is not None else {})})
        _wait_for_hospitals(grid, cfg)
        if rounds - strategy.round_offset > 0:
            strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds - strategy.round_offset,
                           train_config=config, evaluate_config=ConfigRecord(dict(config)),
                           timeout=cfg.federation.round_timeout_s)
        on_done(strategy.latest_arrays or initial)

    return app
