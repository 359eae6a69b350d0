"""Robust aggregation of phase 3's experts (`federation.aggregation`) and the poisoned-hospital
rehearsal (`MEDFEDPURE_POISON_CLIENT`), on replies built by hand: no simulation."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from medfedpure.config import AGGREGATIONS, ConfigError
from medfedpure.federation.client_app import poison_plan, rehearsed_poison
from medfedpure.federation.strategy import ROBUST, expert_strategy
from medfedpure.methods import fingerprint

from conftest import demo


def reply(client: int, weights: np.ndarray, n: int) -> Message:
    """A hospital's training reply as the server receives it."""
    meta = Metadata(run_id=1, message_id=f"m{client}", src_node_id=100 + client, dst_node_id=0,
                    reply_to_message_id="i", group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    arrays = ArrayRecord({"experts.0.w": torch.from_numpy(weights),
                          "experts.0.bn.num_batches_tracked": torch.tensor(7)})
    metrics = MetricRecord({"partition-id": client, "num-examples": n, "train_loss": 0.5 + client,
                            "gate_entropy": 0.1})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), metadata=meta)


def aggregate(rule: str, honest: list[float], poisoned: float | None = None, trim: float = 0.2):
    values = honest + ([poisoned] if poisoned is not None else [])
    strategy = expert_strategy(rule)(num_rounds=1, num_clients=len(values), min_fit_fraction=0.5,
                                     **({"beta": trim} if rule == "trimmed-mean" else {}))
    replies = [reply(c, np.array([v, -v], np.float32), n=10 * (c + 1)) for c, v in enumerate(values)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    return {k: v.numpy() for k, v in arrays.items()}, dict(metrics), strategy


def test_every_configured_rule_has_a_strategy_and_the_robust_ones_are_flowers():
    assert AGGREGATIONS == ("fedavg", *ROBUST)
    assert expert_strategy("fedavg").__name__ == "ExpertFedAvg"
    for rule, flower in ROBUST.items():
        assert issubclass(expert_strategy(rule), flower)
    with pytest.raises(ValueError, match="federation.aggregation"):
        expert_strategy("krum")


def test_one_outlier_moves_fedavg_but_not_the_median_or_the_trimmed_mean():
    honest = [1.0, 2.0, 3.0, 4.0]
    avg, metrics, _ = aggregate("fedavg", honest, poisoned=1000.0)
    n = np.arange(1, 6) * 10.0
    assert avg["experts.0.w"][0] == pytest.approx(np.dot(n, honest + [1000.0]) / n.sum())  # n-weighted
    median, _, _ = aggregate("median", honest, poisoned=1000.0)
    assert median["experts.0.w"].tolist() == [3.0, -3.0]  # median of 1, 2, 3, 4, 1000
    trimmed, _, _ = aggregate("trimmed-mean", honest, poisoned=1000.0, trim=0.2)  # one cut from each tail
    assert trimmed["experts.0.w"].tolist() == [3.0, -3.0]  # mean of 2, 3, 4
    for arrays in (avg, median, trimmed):  # an integer buffer stays an integer
        assert arrays["experts.0.bn.num_batches_tracked"].dtype == np.int64
        assert int(arrays["experts.0.bn.num_batches_tracked"]) == 7
    assert metrics["train_loss"] == pytest.approx(np.dot(n, 0.5 + np.arange(5)) / n.sum())  # metrics: n-weighted


def test_the_robust_rule_keeps_the_strategys_bookkeeping():
    _, metrics, strategy = aggregate("median", [1.0, 2.0, 3.0])
    rec = strategy.history[1]
    assert sorted(rec["clients"]) == [0, 1, 2] and rec["clients"][2]["n_train"] == 30
    assert metrics["train_loss"] == pytest.approx((10 * 0.5 + 20 * 1.5 + 30 * 2.5) / 60)  # still n-weighted


def test_the_rule_is_validated_and_changes_phase_3s_fingerprint_only():
    cfg = demo()
    for bad, field in (("federation.aggregation=krum", "federation.aggregation"),
                       ("federation.trim_fraction=0.5", "federation.trim_fraction")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            demo(bad).validate()
    with pytest.raises(ConfigError, match="cuts at least one hospital"):  # 0.1 of 3 hospitals cuts none
        demo("data.num_clients=3", "federation.aggregation=trimmed-mean").validate()

    def variant(*overrides):
        return demo("data.num_clients=3", *overrides).validate()

    plain, median = variant(), variant("federation.aggregation=median")
    trimmed = variant("federation.aggregation=trimmed-mean", "federation.trim_fraction=0.34")
    prints = {fingerprint(c, "train") for c in (plain, median, trimmed)}
    assert len(prints) == 3  # each rule makes other experts
    assert fingerprint(variant("federation.aggregation=trimmed-mean", "federation.trim_fraction=0.4"), "train") \
        != fingerprint(trimmed, "train")
    assert fingerprint(median, "mae") == fingerprint(plain, "mae")  # phases 1-2 stay FedAvg
    # trim_fraction matters only to the trimmed mean (runs made before the field still resume)
    assert fingerprint(variant("federation.trim_fraction=0.3"), "train") == fingerprint(plain, "train")
    assert fingerprint(cfg, "train") == fingerprint(demo(), "train")


def test_a_rehearsed_poisoned_hospital_sends_what_it_says(monkeypatch):
    sent = ArrayRecord({"experts.w": torch.ones(4), "experts.bn.running_var": torch.ones(4),
                        "experts.bn.num_batches_tracked": torch.tensor(3)})
    trained = {"experts.w": torch.full((4,), 1.5), "experts.bn.running_var": torch.full((4,), 2.0),
               "experts.bn.num_batches_tracked": torch.tensor(4)}
    monkeypatch.delenv("MEDFEDPURE_POISON_CLIENT", raising=False)
    assert poison_plan(1) is None and rehearsed_poison(None, 1, 1, sent, trained) is trained  # off by default
    monkeypatch.setenv("MEDFEDPURE_POISON_CLIENT", "1=sign-flip*2")
    assert poison_plan(0) is None  # another hospital: as trained
    flipped = rehearsed_poison(poison_plan(1), 1, 1, sent, trained)
    assert flipped["experts.w"].tolist() == [0.0] * 4  # 1 - 2 x 0.5
    assert torch.equal(flipped["experts.bn.running_var"], trained["experts.bn.running_var"])  # statistics as trained
    assert int(flipped["experts.bn.num_batches_tracked"]) == 4
    monkeypatch.setenv("MEDFEDPURE_POISON_CLIENT", "0=noise,1=scale")
    assert poison_plan(1) == ("scale", 10.0) and poison_plan(0) == ("noise", 1.0)
    assert rehearsed_poison(poison_plan(1), 1, 1, sent, trained)["experts.w"].tolist() == [6.0] * 4  # 1 + 10 x 0.5
    weights = {"experts.w": 3 * torch.randn(1000, generator=torch.Generator().manual_seed(0))}
    zeros = ArrayRecord({"experts.w": torch.zeros(1000)})
    noise = rehearsed_poison(("noise", 1.0), 0, 1, zeros, weights)["experts.w"]  # the weights' spread, in their place
    assert float(noise.std()) == pytest.approx(float(weights["experts.w"].std()), rel=0.1)
    assert float(torch.corrcoef(torch.stack([noise, weights["experts.w"]]))[0, 1]) == pytest.approx(0, abs=0.1)
    assert torch.equal(noise, rehearsed_poison(("noise", 1.0), 0, 1, zeros, weights)["experts.w"])  # same on a rerun
    assert not torch.equal(noise, rehearsed_poison(("noise", 1.0), 0, 2, zeros, weights)["experts.w"])  # per round
    for bad in ("1=flip", "1=scale*x", "x=noise", "0=noise,2=scale*inf"):  # every entry checked, for any hospital
        monkeypatch.setenv("MEDFEDPURE_POISON_CLIENT", bad)
        with pytest.raises(RuntimeError, match="MEDFEDPURE_POISON_CLIENT: '.*' is not <client>=<kind>"):
            poison_plan(0)
