"""Run a ServerApp and ClientApp as a Flower simulation on this machine (Ray backend, one
ClientApp at a time on this machine's cores)."""

from __future__ import annotations

import logging
import os
import warnings

from medfedpure.config import ExperimentConfig

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def flower_environment() -> None:
    """No telemetry, no dependency installation at run time (unless the user set otherwise)."""
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)


class _ClientFailuresInOneLine(logging.Filter):
    """Flower logs a client's exception with the Ray traceback around it (hundreds of lines); the
    strategy already reports each failed client in one line, so these records are dropped unless
    the log level asks for everything (-v)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("ClientAppException" in text or "processing a message by RayBackend" in text)


def run_flower(server_app, client_app, cfg: ExperimentConfig, flower_log_level: int = logging.ERROR) -> None:
    """A Flower simulation with one SuperNode per client of `cfg`."""
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
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.data.num_clients,
                           backend_name=cfg.federation.backend, backend_config=backend_config)
    finally:
        flwr_logger.setLevel(old_level)
        flwr_logger.removeFilter(quiet)
