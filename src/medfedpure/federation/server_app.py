"""Flower ServerApps: FedAvg of the experts (phase 3, then the defended evaluation) and
plain FedAvg of a whole defense model (phases 1-2)."""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from medfedpure.config import ExperimentConfig
from medfedpure.federation.strategy import ExpertFedAvg, FederationError, PretrainFedAvg, accept_replies


def make_server_app(cfg: ExperimentConfig, initial_experts: ArrayRecord, out_dir: str,
                    strategy: ExpertFedAvg, on_done: Callable[[ArrayRecord], None],
                    defense_paths: dict[str, str] | None = None,
                    on_defense: Callable[[list[dict]], None] | None = None) -> ServerApp:
    """Rounds `strategy.round_offset + 1 .. cfg.train.rounds` (all of them unless resuming)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = ConfigRecord({"experiment": cfg.to_json(), "out-dir": out_dir, **(defense_paths or {}),
                               "resume-round": strategy.round_offset})
        remaining = cfg.train.rounds - strategy.round_offset
        if remaining > 0:
            strategy.start(grid=grid, initial_arrays=initial_experts, num_rounds=remaining,
                           train_config=config, evaluate_config=ConfigRecord(dict(config)))
        final = strategy.latest_arrays or initial_experts
        on_done(final)
        if defense_paths and on_defense is not None:
            config["resume-round"] = cfg.train.rounds  # a client restarted since round 1 restores its gate
            on_defense(_defended_evaluation(grid, final, config, cfg.data.num_clients,
                                            cfg.federation.min_fit_fraction, strategy.clients_of))

    return app


def wait_for_nodes(grid: Grid, count: int, timeout_s: float = 600.0) -> list[int]:
    """The ids of `count` connected clients, waiting for them to connect (a resumed run reaches its
    first query before the simulation's clients have registered)."""
    deadline = time.monotonic() + timeout_s
    while True:
        ids = list(grid.get_node_ids())
        if len(ids) >= count:
            return ids
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(ids)} of {count} clients connected within {timeout_s:.0f} s")
        time.sleep(0.5)


def _defended_evaluation(grid: Grid, experts: ArrayRecord, config: ConfigRecord, num_clients: int,
                         min_fraction: float = 1.0, clients_of: dict[int, int] | None = None) -> list[dict]:
    """One query to every client: evaluate the final experts with its own gate and defense."""
    ExpertFedAvg.check_keys(experts.keys(), "server -> client defense query")
    messages = [Message(content=RecordDict({"arrays": experts, "config": config}), message_type=MessageType.QUERY,
                        dst_node_id=node) for node in wait_for_nodes(grid, num_clients)]
    replies = list(grid.send_and_receive(messages, timeout=3600 * 6))
    valid, _ = accept_replies(replies, num_clients, min_fraction, "defended evaluation", clients_of or {})
    return [dict(m.content["metrics"]) for m in valid]


def make_strategy(cfg: ExperimentConfig, on_round_end=None, keep_client_arrays: bool = False,
                  round_offset: int = 0, history: dict | None = None) -> ExpertFedAvg:
    return ExpertFedAvg(num_rounds=cfg.train.rounds, on_round_end=on_round_end,
                        keep_client_arrays=keep_client_arrays, round_offset=round_offset, history=history,
                        num_clients=cfg.data.num_clients, min_fit_fraction=cfg.federation.min_fit_fraction)


def make_pretrain_server_app(cfg: ExperimentConfig, phase: str, initial: ArrayRecord, strategy: PretrainFedAvg,
                             rounds: int, on_done: Callable[[ArrayRecord], None]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = ConfigRecord({"experiment": cfg.to_json(), "phase": phase})
        if rounds - strategy.round_offset > 0:
            strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds - strategy.round_offset,
                           train_config=config, evaluate_config=ConfigRecord(dict(config)))
        on_done(strategy.latest_arrays or initial)

    return app
