"""Flower ServerApp: FedAvg of the experts for `rounds` rounds, evaluated every round."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from medfedpure.config import ExperimentConfig
from medfedpure.federation.strategy import ExpertFedAvg


def make_server_app(cfg: ExperimentConfig, initial_experts: ArrayRecord, out_dir: str,
                    strategy: ExpertFedAvg, on_done: Callable[[ArrayRecord], None]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = ConfigRecord({"experiment": cfg.to_json(), "out-dir": out_dir})
        result = strategy.start(grid=grid, initial_arrays=initial_experts, num_rounds=cfg.train.rounds,
                                train_config=config, evaluate_config=ConfigRecord(dict(config)))
        on_done(result.arrays)

    return app


def make_strategy(cfg: ExperimentConfig, on_round_end=None, keep_client_arrays: bool = False) -> ExpertFedAvg:
    n = cfg.data.num_clients
    return ExpertFedAvg(num_rounds=cfg.train.rounds, on_round_end=on_round_end,
                        keep_client_arrays=keep_client_arrays, fraction_train=1.0, fraction_evaluate=1.0,
                        min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)
