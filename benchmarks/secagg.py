"""What Flower's secure aggregation (SecAgg+) costs on what MedFedPure's hospitals send (issue 29).

    python benchmarks/secagg.py [--preset br35h-cpu] [--clients N] [--rounds R] [--out benchmarks/secagg.json]

Flower 1.42 has SecAgg+ only in its legacy workflow API: `flwr.server.workflow.SecAggPlusWorkflow`
drives a legacy `Strategy` through a `LegacyContext`, and `secaggplus_mod` reads a legacy `FitRes`
from the ClientApp's reply. Our phase 3 runs on the Message API (`ExpertFedAvg`, `@app.train`
replies with `arrays` and `metrics` records), so it cannot take SecAgg+ as it is. This benchmark
runs SecAgg+ where it runs: the legacy workflow in Flower's simulation, every hospital sending
arrays of exactly the shapes phase 3's experts have in the preset (seeded values of the scale of
trained weights; no training, so the time is the protocol's alone), against the same rounds with
plain FedAvg. It checks that the securely aggregated mean is the plain one up to SecAgg+'s
quantization, and writes the wall time of each, the payload and that error as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from medfedpure.config import ExperimentConfig, load_preset
from medfedpure.data.datasets import BR35H_CLASSES, CIFAR10_CLASSES
from medfedpure.federation.simulation import flower_environment, run_flower
from medfedpure.methods import new_model, task
from medfedpure.storage import write_json

SCALE = 0.05  # the values' spread: trained convolution weights are of this order, inside SecAgg+'s clipping range


def expert_shapes(cfg: ExperimentConfig) -> list[tuple[int, ...]]:
    """The shapes of what a hospital sends in phase 3 (the experts' state), a 0-d array (BatchNorm's
    step counter) as one value of shape (1,): SecAgg+ returns a 0-d array shifted by (n - 1) times its
    clipping range (measured: 16.0 off with 3 hospitals), so an app must send none."""
    known = {"br35h": len(BR35H_CLASSES), "cifar10": len(CIFAR10_CLASSES)}  # no need to read the scans
    n_classes = len(cfg.data.classes) if cfg.data.classes else known.get(cfg.data.dataset) or task.num_classes(cfg)
    model = new_model(cfg, n_classes, init_seed=0)
    return [tuple(v.shape) or (1,) for v in model.expert_state().values()]


def update(shapes: list[tuple[int, ...]], client: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1000 + client)
    return [(SCALE * rng.standard_normal(s)).astype(np.float32) for s in shapes]


def _apps(shapes, n: int, rounds: int, secure: bool, record: Path):
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    class Hospital(NumPyClient):
        def __init__(self, client: int) -> None:
            self.client = client

        def fit(self, parameters, config):
            return update(shapes, self.client), 168, {}

    def client_fn(context: Context):
        return Hospital(int(context.node_config["partition-id"])).to_client()

    class Recorded(FedAvg):
        def aggregate_fit(self, server_round, results, failures):
            params, metrics = super().aggregate_fit(server_round, results, failures)
            mean = parameters_to_ndarrays(params)
            record.write_text(json.dumps({"round": server_round, "replies": len(results), "failures": len(failures),
                                          "first": mean[0].ravel()[:4].tolist()}))
            np.savez(record.with_suffix(".npz"), *mean)
            return params, metrics

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = Recorded(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
                            initial_parameters=ndarrays_to_parameters([np.zeros(s, np.float32) for s in shapes]))
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        # every hospital shares its key with all the others and any half of them can rebuild it
        fit = SecAggPlusWorkflow(num_shares=n, reconstruction_threshold=max(2, n // 2)) if secure else None
        (DefaultWorkflow(fit_workflow=fit) if fit else DefaultWorkflow())(grid, legacy)

    client = ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secure else [])
    return server, client


def measure(cfg: ExperimentConfig, rounds: int, secure: bool, folder: Path) -> tuple[float, list[np.ndarray]]:
    shapes = expert_shapes(cfg)
    record = folder / ("secure.json" if secure else "plain.json")
    server, client = _apps(shapes, cfg.data.num_clients, rounds, secure, record)
    t0 = time.perf_counter()
    run_flower(server, client, cfg)
    seconds = time.perf_counter() - t0
    if not record.is_file():
        raise RuntimeError(f"the {'SecAgg+' if secure else 'plain'} run aggregated nothing")
    saved = np.load(record.with_suffix(".npz"))
    return seconds, [saved[k] for k in saved.files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="br35h-cpu")
    parser.add_argument("--clients", type=int, help="hospitals (default: the preset's data.num_clients)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/secagg.json"))
    args = parser.parse_args(argv)
    flower_environment()
    cfg = load_preset(args.preset)
    if args.clients is not None:
        cfg.data.num_clients = args.clients
    if cfg.data.num_clients < 3:
        parser.error("SecAgg+ needs at least 3 hospitals (--clients)")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        plain_s, plain = measure(cfg, args.rounds, False, Path(tmp))
        secure_s, secure = measure(cfg, args.rounds, True, Path(tmp))
    expected = [np.zeros_like(a, dtype=np.float64) for a in plain]  # the plain mean, computed here
    for c in range(cfg.data.num_clients):
        for total, part in zip(expected, update([a.shape for a in plain], c)):
            total += part / cfg.data.num_clients
    error = max(float(np.abs(s - p).max()) for s, p in zip(secure, plain))
    exact = max(float(np.abs(p - e).max()) for p, e in zip(plain, expected))
    n_values = int(sum(a.size for a in plain))
    result = {"measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "preset": args.preset,
              "model": f"{cfg.model.num_experts} x {cfg.model.backbone} experts (width {cfg.model.width})",
              "hospitals": cfg.data.num_clients, "rounds": args.rounds, "values_per_hospital": n_values,
              "megabytes_per_hospital": round(4 * n_values / 2**20, 1),
              "plain_fedavg_s": round(plain_s, 1), "secagg_plus_s": round(secure_s, 1),
              "ratio": round(secure_s / plain_s, 2), "secagg_minus_plain_s_per_round": round(
                  (secure_s - plain_s) / args.rounds, 1),
              "max_abs_error_vs_plain_mean": error, "plain_mean_vs_numpy_mean": exact,
              "protocol": "SecAgg+ (Flower's legacy SecAggPlusWorkflow + secaggplus_mod), every hospital sharing "
                          "its key with all others, reconstruction threshold half of them; clipping range 8, "
                          "quantization 2^22",
              "cpus": os.cpu_count()}
    write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
