"""FedAvg over the experts only, with per-client metrics kept for every round."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

from medfedpure.config import MEAN
from medfedpure.federation.privacy import KEY_CLIPPING_NORM, Privacy

SHARED_PREFIX = "experts."

log = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """Too few clients answered, or a message carried something it must not."""


def accept_replies(replies: list[Message], expected: int, min_fraction: float, where: str,
                   clients_of: dict[int, int]) -> tuple[list[Message], list[dict]]:
    """The replies without errors, and a record of every failure (logged by client, with the first
    line of its error). A round goes on when at least `min_fraction` of the `expected` clients
    answered; below that, one FederationError says who failed and why."""
    valid = [m for m in replies if not m.has_error()]
    failed = []
    for m in replies:
        if m.has_error():
            node = int(m.metadata.src_node_id)
            reason = (m.error.reason or "no reason given").strip().splitlines()
            last = reason[-1] if reason else ""
            last = last.split("occurred. Message: ", 1)[-1]  # Flower's wrapper around the client's own error
            failed.append({"node": node, "client": clients_of.get(node), "error": last})
    unnamed = [f for f in failed if f["client"] is None]
    if len(unnamed) == 1:  # a node not heard from before (a resumed run): the one client that did not answer
        answered = {int(m.content["metrics"]["partition-id"]) for m in valid if "partition-id" in m.content["metrics"]}
        named = {f["client"] for f in failed if f["client"] is not None}
        unheard = [c for c in range(expected) if c not in answered | named]
        if len(unheard) == 1 and len(replies) == expected:
            unnamed[0]["client"] = unheard[0]
    failed += _missing(replies, expected, clients_of)
    for f in failed:
        who = f"client {f['client']}" if f["client"] is not None else f"node {f['node']}"
        log.warning("%s: %s failed: %s", where, who, f["error"])
    needed = needed_answers(expected, min_fraction)
    if len(valid) < needed:
        first = f"; first failure: {failed[0]['error']}" if failed else ""
        raise FederationError(f"{where}: only {len(valid)} of {expected} clients answered, {needed} needed "
                              f"(federation.min_fit_fraction={min_fraction:g}){first}")
    return valid, failed


def _missing(replies: list[Message], expected: int, clients_of: dict[int, int]) -> list[dict]:
    """Clients with no reply at all (not connected when the round began, or timed out)."""
    count = expected - len(replies)
    if count <= 0:
        return []
    heard = {clients_of.get(int(m.metadata.src_node_id)) for m in replies}
    heard |= {int(m.content["metrics"]["partition-id"]) for m in replies
              if not m.has_error() and "partition-id" in m.content["metrics"]}
    silent = [c for c in range(expected) if c not in heard]
    reason = "no answer (not connected, or timed out)"
    if len(silent) == count:
        return [{"node": None, "client": c, "error": reason} for c in silent]
    return [{"node": None, "client": None, "error": reason} for _ in range(count)]


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of a record's serialized arrays."""
    return sum(len(array.data) for array in record.values())


def needed_answers(expected: int, min_fraction: float) -> int:
    return max(1, math.ceil(min_fraction * expected))


class ResumableFedAvg(FedAvg):
    """FedAvg that numbers its rounds after `round_offset` (the rounds a resumed run already did)
    and goes on when at least `min_fit_fraction` of the `num_clients` answered (`accept_replies`);
    with `privacy`, each hospital clips its update and the mean of them gets the server's noise."""

    def __init__(self, num_clients: int = 1, min_fit_fraction: float = 1.0, round_offset: int = 0,
                 rejoin_wait_s: float = 0.0, privacy: Privacy | None = None, **kwargs) -> None:
        # Rounds go to every connected hospital, and wait only for the share that must answer:
        # a hospital that is down must not stall the federation (the server waits for all of them
        # once, before the first round: `server_app.wait_for_nodes`).
        for key in ("min_train_nodes", "min_evaluate_nodes", "min_available_nodes"):
            kwargs.setdefault(key, needed_answers(num_clients, min_fit_fraction))
        kwargs.setdefault("fraction_train", 1.0)
        kwargs.setdefault("fraction_evaluate", 1.0)
        super().__init__(**kwargs)
        self.num_clients, self.min_fit_fraction, self.round_offset = num_clients, min_fit_fraction, round_offset
        self.rejoin_wait_s = rejoin_wait_s  # how long a round waits for a missing hospital to (re)connect
        self.latest_arrays: ArrayRecord | None = None
        self.clients_of: dict[int, int] = {}  # node id -> partition id, learnt from replies
        self.privacy = privacy

    def accept(self, replies: Iterable[Message], where: str) -> tuple[list[Message], list[dict]]:
        valid, failed = accept_replies(list(replies), self.num_clients, self.min_fit_fraction, where,
                                       self.clients_of)
        for msg in valid:
            if "partition-id" in msg.content["metrics"]:
                self.clients_of[int(msg.metadata.src_node_id)] = int(msg.content["metrics"]["partition-id"])
        # Replies in client order, whatever order they arrived in: the weighted sum then adds the same
        # floats in the same order in a simulation and on a deployment (same aggregate to the last bit).
        valid.sort(key=lambda m: int(m.content["metrics"].get("partition-id", -1)))
        return valid, failed

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._wait_for_missing(grid)
        if self.privacy is not None:  # each hospital clips its update to this norm (client_app.private_reply)
            config[KEY_CLIPPING_NORM] = self.privacy.clipping_norm
        return super().configure_train(server_round + self.round_offset, arrays, config, grid)

    def combine(self, server_round: int, replies: list[Message]
                ) -> tuple[ArrayRecord | None, MetricRecord | None, dict | None]:
        """The replies' arrays combined by the rule after this class in the MRO (FedAvg's n-weighted
        mean, or a robust rule `expert_strategy` mixes in), and the round's privacy record: with
        `privacy`, a plain mean of the clipped updates (the noise is calibrated to one, every
        hospital weighing alike) plus the server's Gaussian noise."""
        if self.privacy is None:
            return (*super().aggregate_train(server_round, replies), None)
        weighted_by, self.weighted_by_key = self.weighted_by_key, "dp-weight"
        try:
            arrays, metrics = super().aggregate_train(server_round, replies)
        finally:
            self.weighted_by_key = weighted_by
        if arrays is None:
            return None, metrics, None
        noisy, record = self.privacy.release(server_round, {k: v.numpy() for k, v in arrays.items()}, len(replies))
        log.info("round %d: differential privacy, noise std %.3g; spent epsilon %.3g at delta %g", server_round,
                 record["noise_std"], record["epsilon"], record["delta"])
        return ArrayRecord({k: Array(v) for k, v in noisy.items()}), metrics, record

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def _wait_for_missing(self, grid: Grid) -> None:
        """Give a hospital that dropped out up to `rejoin_wait_s` to reconnect before a round begins."""
        deadline = time.monotonic() + self.rejoin_wait_s
        while len(list(grid.get_node_ids())) < self.num_clients and time.monotonic() < deadline:
            time.sleep(0.5)


class ExpertFedAvg(ResumableFedAvg):
    """Averages each expert weighted by n_i (or, as `expert_strategy`'s robust variants, by the rule
    mixed in after it) and refuses any array outside `experts.*`.

    `history[round]` holds the keys sent and received and each client's metrics;
    with `keep_client_arrays` it also keeps what every client sent (for audits and tests).
    A resumed run passes the rounds already done as `round_offset` and their `history`; each round's
    record names the rule that combined its experts (`aggregation`).
    """

    RULE = MEAN  # `federation.aggregation`: the robust variants of `expert_strategy` name theirs

    def __init__(self, num_rounds: int, on_round_end: Callable[[int, dict], None] | None = None,
                 keep_client_arrays: bool = False, history: dict[int, dict] | None = None,
                 train_extras: dict[str, ArrayRecord] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_rounds = num_rounds
        self.train_extras = dict(train_extras or {})  # e.g. the purifier the experts train through
        self.on_round_end = on_round_end
        self.keep_client_arrays = keep_client_arrays
        self.history: dict[int, dict] = dict(history or {})
        if self.privacy is not None:
            self.privacy.replay(self.history)

    def _accept(self, replies: Iterable[Message], where: str, rec: dict, phase: str) -> list[Message]:
        valid, failed = self.accept(replies, where)
        self.record_failures(rec["round"], phase, failed)
        return valid

    def record_failures(self, server_round: int, phase: str, failed: list[dict]) -> None:
        """Keep a round's failures (`phase`: train, evaluate, defended evaluation) in its history record."""
        if failed:
            self._round(server_round).setdefault("failed", []).extend({"phase": phase, **f} for f in failed)

    def _round(self, server_round: int) -> dict:
        return self.history.setdefault(server_round, {"round": server_round, "clients": {}})

    @staticmethod
    def check_keys(keys: Iterable[str], where: str) -> list[str]:
        keys = sorted(keys)
        bad = [k for k in keys if not k.startswith(SHARED_PREFIX)]
        if bad:
            raise FederationError(f"{where} carried non-expert arrays {bad[:3]}; only experts.* may travel")
        return keys

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rec = self._round(server_round + self.round_offset)
        rec["sent_keys"] = self.check_keys(arrays.keys(), "server -> client train message")
        # tensor payload to each hospital this round: the train message (experts and any extras) and
        # the evaluate message (experts), serialized arrays before message framing and TLS
        rec["sent_bytes"] = 2 * payload_bytes(arrays) + sum(payload_bytes(r) for r in self.train_extras.values())
        if self.keep_client_arrays:
            rec["sent_arrays"] = {k: v.numpy().copy() for k, v in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for msg in messages:
            for name, record in self.train_extras.items():
                msg.content[name] = record
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self.check_keys(arrays.keys(), "server -> client evaluate message")
        config["final"] = server_round + self.round_offset == self.num_rounds
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        rec = self._round(server_round)
        replies = self._accept(replies, f"training round {server_round}", rec, "train")
        dtypes = {}
        for msg in replies:
            dtypes.update(self._record_client(rec, msg))
        agg_arrays, agg_metrics, dp = self.combine(server_round, replies)
        if dp is not None:
            rec["dp"] = dp
        if agg_arrays is not None:
            # Integer buffers (BatchNorm's num_batches_tracked) stay integers.
            agg_arrays = ArrayRecord({k: Array(_cast(v.numpy(), dtypes[k])) for k, v in agg_arrays.items()})
            self.latest_arrays = agg_arrays
            rec["aggregation"] = self.RULE
            if self.keep_client_arrays:
                rec["aggregated"] = {k: v.numpy().copy() for k, v in agg_arrays.items()}
        rec["train"] = _without_id(agg_metrics)
        return agg_arrays, _metrics_without_id(agg_metrics)

    def _record_client(self, rec: dict, msg: Message) -> dict:
        """One client's training reply into the round's record; returns its arrays' dtypes."""
        arrays = msg.content["arrays"]
        metrics = dict(msg.content["metrics"])
        client = int(metrics["partition-id"])
        keys = self.check_keys(arrays.keys(), f"client {client} -> server reply")
        entry = rec["clients"].setdefault(client, {})
        entry.update(received_keys=keys, received_bytes=payload_bytes(arrays), n_train=int(metrics["num-examples"]),
                     train_loss=float(metrics["train_loss"]), gate_entropy=float(metrics["gate_entropy"]))
        if "adv_share" in metrics:  # adversarial training: the share of training inputs that were PGD
            entry["adv_share"] = float(metrics["adv_share"])
        if "dp_update_norm" in metrics:  # its update's L2 norm before clipping (to choose the clipping norm)
            entry["dp_update_norm"] = float(metrics["dp_update_norm"])
        if self.keep_client_arrays:
            entry["arrays"] = {k: v.numpy().copy() for k, v in arrays.items()}
        return {k: v.numpy().dtype for k, v in arrays.items()}

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        rec = self._round(server_round)
        replies = self._accept(replies, f"evaluation round {server_round}", rec, "evaluate")
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
        return _metrics_without_id(agg)


# Flower's robust rules for phase 3's experts, by `federation.aggregation` (fedavg: ExpertFedAvg itself)
ROBUST = {"median": FedMedian, "trimmed-mean": FedTrimmedAvg}


def expert_strategy(aggregation: str) -> type[ExpertFedAvg]:
    """ExpertFedAvg whose arrays are combined by `aggregation`: its own n-weighted mean, or Flower's
    coordinate-wise median or trimmed mean (ExpertFedAvg's checks and bookkeeping come first in the
    MRO, then the rule's `aggregate_train`); the round's metrics stay n-weighted means."""
    if aggregation == MEAN:
        return ExpertFedAvg
    if aggregation not in ROBUST:
        raise ValueError(f"federation.aggregation: '{aggregation}' is not one of fedavg, {', '.join(ROBUST)}")
    rule = ROBUST[aggregation]
    return type(f"Expert{rule.__name__}", (ExpertFedAvg, rule),
                {"__doc__": f"ExpertFedAvg with {rule.__name__}.", "RULE": aggregation})


class PretrainFedAvg(ResumableFedAvg):
    """Plain FedAvg of a whole MAE / U-Net, reporting each round's weighted losses. Its messages
    carry the `pretrain` action, which the ClientApp routes to its phase 1-2 functions."""

    ACTION = "pretrain"

    def _construct_messages(self, record, node_ids, message_type):
        return super()._construct_messages(record, node_ids, f"{message_type}.{self.ACTION}")

    def __init__(self, num_clients: int, on_round_end: Callable[[int, dict], None], round_offset: int = 0,
                 min_fit_fraction: float = 1.0, rejoin_wait_s: float = 0.0, privacy: Privacy | None = None,
                 done: list[dict] | None = None) -> None:
        super().__init__(num_clients=num_clients, min_fit_fraction=min_fit_fraction, round_offset=round_offset,
                         rejoin_wait_s=rejoin_wait_s, privacy=privacy)
        self.on_round_end = on_round_end
        self.rows: dict[int, dict] = {}
        if privacy is not None:  # the releases of the rounds a resumed phase already made (`done`: its rows)
            privacy.replay({r["round"]: r for r in done or []})

    def aggregate_train(self, server_round, replies):
        server_round += self.round_offset
        replies, _ = self.accept(replies, f"pretraining round {server_round}")
        arrays, metrics, dp = self.combine(server_round, replies)
        self.latest_arrays = arrays
        row = self.rows.setdefault(server_round, {"round": server_round})
        row.update({k: float(v) for k, v in metrics.items() if k.startswith("train_")})
        if dp is not None:
            row["dp"] = dp
        return arrays, _metrics_without_id(metrics)

    def aggregate_evaluate(self, server_round, replies):
        server_round += self.round_offset
        replies, _ = self.accept(replies, f"pretraining evaluation {server_round}")
        metrics = super().aggregate_evaluate(server_round, replies)
        row = self.rows.setdefault(server_round, {"round": server_round})
        row["test_loss"] = float(metrics["test_loss"]) if metrics is not None else None
        row.update({k: float(v) for k, v in (metrics or {}).items() if k.startswith("test_") and k != "test_loss"})
        self.on_round_end(server_round, row)
        return _metrics_without_id(metrics)


class PurifierFedAvg(PretrainFedAvg):
    """Phase 4: FedAvg of the U-Net each hospital fine-tunes against its own classifier. Its messages
    carry the `finetune` action and the phase-3 experts beside the U-Net (each hospital adds its gate)."""

    ACTION = "finetune"

    def __init__(self, num_clients: int, on_round_end: Callable[[int, dict], None], experts: ArrayRecord,
                 **kwargs) -> None:
        super().__init__(num_clients, on_round_end, **kwargs)
        ExpertFedAvg.check_keys(experts.keys(), "server -> client purifier message")
        self.experts = experts

    def _construct_messages(self, record, node_ids, message_type):
        record["experts"] = self.experts
        return super()._construct_messages(record, node_ids, message_type)


def _cast(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        return np.asarray(np.rint(value), dtype=dtype)
    return np.asarray(value, dtype=dtype)


def _without_id(metrics: MetricRecord | None) -> dict:
    return {k: v for k, v in (metrics or {}).items() if k != "partition-id"}


def _metrics_without_id(metrics: MetricRecord | None) -> MetricRecord | None:
    """What Flower logs and keeps as a round's aggregate: a weighted mean of partition ids means nothing."""
    return None if metrics is None else MetricRecord(_without_id(metrics))
