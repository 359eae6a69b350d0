"""FedAvg over the experts only, with per-client metrics kept for every round."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

SHARED_PREFIX = "experts."


class FederationError(RuntimeError):
    """A client failed, or a message carried something it must not."""


class ExpertFedAvg(FedAvg):
    """Averages each expert weighted by n_i and refuses any array outside `experts.*`.

    `history[round]` holds the keys sent and received and each client's metrics;
    with `keep_client_arrays` it also keeps what every client sent (for audits and tests).
    A resumed run passes the rounds already done as `round_offset` and their `history`.
    """

    def __init__(self, num_rounds: int, on_round_end: Callable[[int, dict], None] | None = None,
                 keep_client_arrays: bool = False, round_offset: int = 0,
                 history: dict[int, dict] | None = None, **kwargs) -> None:
        kwargs.setdefault("min_train_nodes", 1)
        kwargs.setdefault("min_evaluate_nodes", 1)
        kwargs.setdefault("min_available_nodes", 1)
        super().__init__(**kwargs)
        self.num_rounds = num_rounds
        self.on_round_end = on_round_end
        self.keep_client_arrays = keep_client_arrays
        self.round_offset = round_offset
        self.history: dict[int, dict] = dict(history or {})
        self.latest_arrays: ArrayRecord | None = None

    def _round(self, server_round: int) -> dict:
        return self.history.setdefault(server_round, {"round": server_round, "clients": {}})

    @staticmethod
    def _check_keys(keys: Iterable[str], where: str) -> list[str]:
        keys = sorted(keys)
        bad = [k for k in keys if not k.startswith(SHARED_PREFIX)]
        if bad:
            raise FederationError(f"{where} carried non-expert arrays {bad[:3]}; only experts.* may travel")
        return keys

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        rec = self._round(server_round)
        rec["sent_keys"] = self._check_keys(arrays.keys(), "server -> client train message")
        if self.keep_client_arrays:
            rec["sent_arrays"] = {k: v.numpy().copy() for k, v in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self._check_keys(arrays.keys(), "server -> client evaluate message")
        config["final"] = server_round == self.num_rounds
        return super().configure_evaluate(server_round, arrays, config, grid)

    def _raise_on_errors(self, replies: list[Message], phase: str) -> None:
        failed = [m for m in replies if m.has_error()]
        if failed:
            reasons = "; ".join(f"node {m.metadata.src_node_id}: {m.error.reason}" for m in failed[:3])
            raise FederationError(f"{len(failed)} client(s) failed during {phase}: {reasons}")

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        self._raise_on_errors(replies, f"training round {server_round}")
        rec = self._round(server_round)
        dtypes = {}
        for msg in replies:
            arrays = msg.content["arrays"]
            metrics = dict(msg.content["metrics"])
            client = int(metrics["partition-id"])
            keys = self._check_keys(arrays.keys(), f"client {client} -> server reply")
            entry = rec["clients"].setdefault(client, {})
            entry.update(received_keys=keys, n_train=int(metrics["num-examples"]),
                         train_loss=float(metrics["train_loss"]), gate_entropy=float(metrics["gate_entropy"]))
            if "adv_share" in metrics:  # adversarial training: the share of training inputs that were PGD
                entry["adv_share"] = float(metrics["adv_share"])
            if self.keep_client_arrays:
                entry["arrays"] = {k: v.numpy().copy() for k, v in arrays.items()}
            dtypes.update({k: v.numpy().dtype for k, v in arrays.items()})
        agg_arrays, agg_metrics = super().aggregate_train(server_round, replies)
        if agg_arrays is not None:
            # Integer buffers (BatchNorm's num_batches_tracked) stay integers.
            agg_arrays = ArrayRecord({k: Array(_cast(v.numpy(), dtypes[k])) for k, v in agg_arrays.items()})
            self.latest_arrays = agg_arrays
            if self.keep_client_arrays:
                rec["aggregated"] = {k: v.numpy().copy() for k, v in agg_arrays.items()}
        rec["train"] = _without_id(agg_metrics)
        return agg_arrays, agg_metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        replies = list(replies)
        self._raise_on_errors(replies, f"evaluation round {server_round}")
        rec = self._round(server_round)
        for msg in replies:
            metrics = dict(msg.content["metrics"])
            client = int(metrics["partition-id"])
            rec["clients"].setdefault(client, {}).update(
                {k: v for k, v in metrics.items() if k not in {"partition-id", "num-examples"}},
                n_test=int(metrics["num-examples"]))
        agg = super().aggregate_evaluate(server_round, replies)
        rec["evaluate"] = _without_id(agg)
        if self.on_round_end is not None:
            self.on_round_end(server_round, rec)
        return agg


def _cast(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        return np.asarray(np.rint(value), dtype=dtype)
    return np.asarray(value, dtype=dtype)


def _without_id(metrics: MetricRecord | None) -> dict:
    return {k: v for k, v in (metrics or {}).items() if k != "partition-id"}
