"""Client-level differential privacy of phase 3's experts (`federation.dp_*`): the clipping, the
noise and the accountant, on arrays built by hand (the simulation test is in test_federation.py)."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from medfedpure.config import ConfigError, apply_overrides
from medfedpure.federation.privacy import Privacy, clip_update, epsilon_after, noise_for_epsilon
from medfedpure.federation.strategy import ExpertFedAvg
from medfedpure.methods import fingerprint

from conftest import demo


def test_more_noise_spends_less_and_the_solved_noise_meets_its_epsilon():
    eps = [epsilon_after(z, rounds=10, delta=1e-5, hospitals=10) for z in (0.5, 1.0, 2.0, 4.0)]
    assert eps == sorted(eps, reverse=True) and eps[-1] > 0
    assert epsilon_after(1.0, 20, 1e-5, 10) > epsilon_after(1.0, 10, 1e-5, 10)  # rounds compose
    for target in (1.0, 3.0, 8.0):
        z = noise_for_epsilon(target, rounds=10, delta=1e-5, hospitals=10)
        assert 0.99 * target <= epsilon_after(z, 10, 1e-5, 10) <= target
        assert epsilon_after(0.995 * z, 10, 1e-5, 10) > target  # and no more noise than it needs


def test_an_update_is_clipped_to_the_norm_and_integer_buffers_go_back_as_they_came():
    sent = {"w": np.zeros(4, np.float32), "bn.running_mean": np.ones(2, np.float32),
            "bn.num_batches_tracked": np.array(5, np.int64)}
    new = {"w": np.array([3, 0, 0, 0], np.float32), "bn.running_mean": np.array([1, 5], np.float32),
           "bn.num_batches_tracked": np.array(9, np.int64)}
    out, before = clip_update(sent, new, clipping_norm=1.0)
    assert before == pytest.approx(5.0)  # sqrt(3^2 + 4^2): the running statistics are data too
    update = np.concatenate([out["w"] - sent["w"], out["bn.running_mean"] - sent["bn.running_mean"]])
    assert np.linalg.norm(update) == pytest.approx(1.0, rel=1e-5)
    assert np.allclose(update, np.array([3, 0, 0, 0, 0, 4]) / 5, atol=1e-6)
    assert out["bn.num_batches_tracked"] == 5 and out["bn.num_batches_tracked"].dtype == np.int64
    scalar, _ = clip_update({"s": np.array(0.0, np.float32)}, {"s": np.array(2.0, np.float32)}, 1.0)
    assert isinstance(scalar["s"], np.ndarray) and scalar["s"].shape == () and scalar["s"] == 1.0
    small, norm = clip_update(sent, {**new, "w": np.full(4, 0.1, np.float32),
                                     "bn.running_mean": np.ones(2, np.float32)}, 1.0)
    assert norm == pytest.approx(0.2) and np.allclose(small["w"], 0.1)  # within the norm: unchanged


def test_the_noise_has_its_std_is_reproducible_and_the_accountant_resumes():
    privacy = Privacy(noise_multiplier=2.0, clipping_norm=0.5, delta=1e-5, hospitals=10, seed=3)
    mean = {"w": np.zeros(200_000, np.float32), "n": np.array(4, np.int64), "s": np.array(1.0, np.float32)}
    noisy, rec = privacy.release(1, mean, answered=8)
    assert rec["noise_std"] == pytest.approx(2.0 * 0.5 / 8)
    assert np.std(noisy["w"]) == pytest.approx(rec["noise_std"], rel=0.01) and noisy["n"] == 4
    assert isinstance(noisy["s"], np.ndarray) and noisy["s"].dtype == np.float32  # 0-d arrays stay arrays
    again, _ = Privacy(2.0, 0.5, 1e-5, 10, seed=3).release(1, mean, 8)
    assert np.array_equal(again["w"], noisy["w"])  # the same seed and round: the same noise
    _, rec2 = privacy.release(2, mean, 8)
    assert rec2["epsilon"] == pytest.approx(epsilon_after(2.0, 2, 1e-5, 10)) and rec2["epsilon"] > rec["epsilon"]
    resumed = Privacy(2.0, 0.5, 1e-5, 10, seed=3)
    resumed.replay({1: {"dp": rec}, 2: {"dp": rec2}})
    _, rec3 = resumed.release(3, mean, 8)
    assert rec3["epsilon"] == pytest.approx(epsilon_after(2.0, 3, 1e-5, 10))


def _reply(client: int, value: float, n: int) -> Message:
    meta = Metadata(run_id=1, message_id=f"m{client}", src_node_id=100 + client, dst_node_id=0,
                    reply_to_message_id="i", group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    metrics = MetricRecord({"partition-id": client, "num-examples": n, "train_loss": 0.5, "gate_entropy": 0.1,
                            "dp-weight": 1, "dp_update_norm": 1.0})
    arrays = ArrayRecord({"experts.0.w": torch.full((50_000,), value)})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), metadata=meta)


def test_the_server_averages_hospitals_alike_adds_the_noise_and_records_the_spend():
    privacy = Privacy(1.0, 1.0, 1e-5, 2, seed=0)
    strategy = ExpertFedAvg(num_rounds=1, num_clients=2, min_fit_fraction=0.5, privacy=privacy)
    arrays, _ = strategy.aggregate_train(1, [_reply(0, 1.0, 10), _reply(1, 3.0, 30)])
    w = arrays["experts.0.w"].numpy()
    assert np.mean(w) == pytest.approx(2.0, abs=0.01)  # a plain mean: n-weighted it would be 2.5
    assert np.std(w) == pytest.approx(0.5, rel=0.02)  # z * C / m = 1 * 1 / 2
    dp = strategy.history[1]["dp"]
    assert dp["epsilon"] == pytest.approx(epsilon_after(1.0, 1, 1e-5, 2)) and dp["hospitals"] == 2
    assert strategy.history[1]["clients"][0]["dp_update_norm"] == 1.0


def test_privacy_settings_are_checked_and_change_the_fingerprint():
    cfg = demo()
    private = apply_overrides(cfg, ["federation.dp_epsilon=8"])
    assert private.federation.private and not cfg.federation.private
    assert fingerprint(private, "train") != fingerprint(cfg, "train")
    assert fingerprint(private, "mae") == fingerprint(cfg, "mae")  # phases 1-2 private only when asked
    for bad, field in ((["federation.dp_epsilon=8", "federation.aggregation=median"], "federation.aggregation"),
                       (["federation.dp_epsilon=8", "federation.dp_noise_multiplier=1"], "federation.dp_epsilon"),
                       (["federation.dp_epsilon=0"], "federation.dp_epsilon"),
                       (["federation.dp_noise_multiplier=1", "federation.dp_clipping_norm=0"],
                        "federation.dp_clipping_norm"),
                       (["federation.dp_noise_multiplier=1", "federation.dp_delta=1"], "federation.dp_delta"),
                       (["federation.dp_pretraining=true"], "federation.dp_pretraining"),
                       (["federation.dp_epsilon=8", "federation.dp_pretraining=true", "defense.training=central"],
                        "federation.dp_pretraining")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            apply_overrides(cfg, bad).validate()


def test_with_dp_pretraining_every_model_that_leaves_a_hospital_shares_one_budget():
    """federation.dp_pretraining: phases 1, 2 (and 4) are released like phase 3, the noise multiplier is
    solved over all their rounds, each phase's accountant starts where the phase before it ended, and
    each phase's noise is its own; a baseline (no defense phases) counts phase 3 alone."""
    from medfedpure.federation.server_app import privacy_for
    from medfedpure.methods import METHODS, private_phases

    cfg = demo("federation.dp_epsilon=8", "defense.diffusion.train.rounds=2", "defense.mae.train.rounds=3",
               "train.rounds=4", "data.num_clients=3").validate()
    both = apply_overrides(cfg, ["federation.dp_pretraining=true"]).validate()
    assert private_phases(cfg) == {"train": 4}
    assert private_phases(both) == {"diffusion": 2, "mae": 3, "train": 4}
    tuned = apply_overrides(both, ["defense.purify_training=true", "defense.purifier.rounds=2"]).validate()
    assert list(private_phases(tuned)) == ["diffusion", "mae", "train", "purifier"]
    assert private_phases(METHODS["fat"].configure(both)) == {"train": 4}
    assert privacy_for(cfg, "mae") is None and privacy_for(cfg, "train").earlier_rounds == 0
    phases = {p: privacy_for(both, p) for p in ("diffusion", "mae", "train")}
    z = noise_for_epsilon(8, 9, 1e-5, 3)
    assert all(pr.noise_multiplier == z for pr in phases.values())
    assert [pr.earlier_rounds for pr in phases.values()] == [0, 2, 5]
    assert len({pr.stream for pr in phases.values()}) == 3 and phases["train"].stream == 0
    # phase 3's last round spends what all nine releases spend: the run's budget, not more
    last = phases["train"]
    for rnd in range(1, 5):
        _, record = last.release(rnd, {"w": np.zeros(2, np.float32)}, 3)
    assert record["epsilon"] == pytest.approx(epsilon_after(z, 9, 1e-5, 3)) and record["epsilon"] <= 8
    # the defense's models are part of the budget: their fingerprints change, and phase 3's too
    for phase in ("diffusion", "mae", "train"):
        assert fingerprint(both, phase) != fingerprint(cfg, phase)
