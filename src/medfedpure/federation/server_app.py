"""Flower ServerApps: FedAvg of the experts (phase 3, then the defended evaluation) and
plain FedAvg of a whole defense model (phases 1-2)."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from medfedpure.config import ExperimentConfig
from medfedpure.federation.strategy import ExpertFedAvg, FederationError


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
            on_defense(_defended_evaluation(grid, final, config))

    return app


def _defended_evaluation(grid: Grid, experts: ArrayRecord, config: ConfigRecord) -> list[dict]:
    """One query to every client: evaluate the final experts with its own gate and defense."""
    ExpertFedAvg._check_keys(experts.keys(), "server -> client defense query")
    messages = [Message(content=RecordDict({"arrays": experts, "config": config}), message_type=MessageType.QUERY,
                        dst_node_id=node) for node in grid.get_node_ids()]
    replies = list(grid.send_and_receive(messages, timeout=3600 * 6))
    failed = [m for m in replies if m.has_error()]
    if failed:
        raise FederationError(f"{len(failed)} client(s) failed the defended evaluation: {failed[0].error.reason}")
    return [dict(m.content["metrics"]) for m in replies]


def make_strategy(cfg: ExperimentConfig, on_round_end=None, keep_client_arrays: bool = False,
                  round_offset: int = 0, history: dict | None = None) -> ExpertFedAvg:
    n = cfg.data.num_clients
    return ExpertFedAvg(num_rounds=cfg.train.rounds, on_round_end=on_round_end,
                        keep_client_arrays=keep_client_arrays, round_offset=round_offset, history=history,
                        fraction_train=1.0, fraction_evaluate=1.0,
                        min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)


class PretrainFedAvg(FedAvg):
    """Plain FedAvg of a whole MAE / U-Net, reporting each round's weighted losses."""

    def __init__(self, num_clients: int, on_round_end: Callable[[int, dict], None], round_offset: int = 0) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=num_clients,
                         min_evaluate_nodes=num_clients, min_available_nodes=num_clients)
        self.on_round_end = on_round_end
        self.round_offset = round_offset
        self.rows: dict[int, dict] = {}
        self.latest_arrays: ArrayRecord | None = None

    def configure_train(self, server_round, arrays, config, grid):
        return super().configure_train(server_round + self.round_offset, arrays, config, grid)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        server_round += self.round_offset
        replies = list(replies)
        failed = [m for m in replies if m.has_error()]
        if failed:
            raise FederationError(f"{len(failed)} client(s) failed in round {server_round}: {failed[0].error.reason}")
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.latest_arrays = arrays
        self.rows.setdefault(server_round, {"round": server_round})["train_loss"] = float(metrics["train_loss"])
        return arrays, metrics

    def aggregate_evaluate(self, server_round, replies):
        server_round += self.round_offset
        metrics = super().aggregate_evaluate(server_round, replies)
        row = self.rows.setdefault(server_round, {"round": server_round})
        row["test_loss"] = float(metrics["test_loss"]) if metrics is not None else None
        self.on_round_end(server_round, row)
        return metrics


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
