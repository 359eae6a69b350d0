"""A real Flower simulation (Ray backend) on the built-in data: what travels, how it is averaged,
what stays on each client, and that the federation learns."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from medfedpure.workflows.training import run_federated

from conftest import demo


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = demo()
    cfg.data.num_clients = 3
    cfg.data.partition = "dirichlet"  # unequal n_i, so a plain mean would differ from FedAvg
    cfg.data.dirichlet_alpha = 1.0
    cfg.train.rounds = 2
    cfg.attack.max_eval_per_client = 32
    out = tmp_path_factory.mktemp("fed")
    return run_federated(cfg, out, keep_client_arrays=True, progress=False)


def test_only_expert_arrays_travel_both_ways(run):
    for rnd, rec in run.history.items():
        assert rec["sent_keys"] and all(k.startswith("experts.") for k in rec["sent_keys"])
        for client in rec["clients"].values():
            assert client["received_keys"] == rec["sent_keys"]
            assert not any(k.startswith("attention.") for k in client["received_keys"])


def test_server_average_is_the_n_weighted_mean(run):
    for rec in run.history.values():
        clients = list(rec["clients"].values())
        n = np.array([c["n_train"] for c in clients], dtype=np.float64)
        assert len(set(n)) > 1, "the test needs clients of different sizes"
        weighting_mattered = False
        for key, agg in rec["aggregated"].items():
            stacked = np.stack([c["arrays"][key].astype(np.float64) for c in clients])
            expected = np.tensordot(n / n.sum(), stacked, axes=1)
            if np.issubdtype(agg.dtype, np.integer):
                assert np.array_equal(agg, np.rint(expected).astype(agg.dtype)), key
            else:
                np.testing.assert_allclose(agg, expected, rtol=1e-5, atol=1e-6, err_msg=key)
                weighting_mattered |= not np.allclose(stacked.mean(0), expected, rtol=1e-4, atol=1e-5)
        assert weighting_mattered
    # next round starts from what the server averaged
    assert all(np.array_equal(run.history[2]["sent_arrays"][k], v)
               for k, v in run.history[1]["aggregated"].items())


def test_each_gate_persists_on_its_client_and_differs(run):
    gates = {}
    for folder in sorted((run.out_dir / "clients").iterdir()):
        history = json.loads((folder / "history.json").read_text())
        train = [h for h in history if h["phase"] == "train"]
        evals = [h for h in history if h["phase"] == "evaluate"]
        assert [h["round"] for h in train] == [1, 2]
        # round 2 starts from the gate this client trained in round 1 (context.state), ...
        assert train[1]["gate_in"] == train[0]["gate_out"] != train[0]["gate_in"]
        # ... and evaluation uses the gate it just trained
        assert [e["gate"] for e in evals] == [t["gate_out"] for t in train]
        gates[folder.name] = load_file(str(folder / "gate.safetensors"))
    assert len(gates) == 3
    first, *rest = gates.values()
    for other in rest:
        assert any(not np.array_equal(first[k], other[k]) for k in first)
    assert all(k.startswith("attention.") for k in first)


def test_learns_and_writes_results(run):
    final = run.final
    assert final["round"] == 2
    assert final["clean_acc"] > 0.65  # chance is 0.5 on the balanced built-in data
    assert 0 <= final["adv_acc"] <= 1
    for name in ("config.json", "environment.json", "partition.json", "metrics.json", "metrics.csv",
                 "summary.json", "global_experts.safetensors", "accuracy_per_round.png"):
        assert (run.out_dir / name).is_file(), name
    experts = load_file(str(run.out_dir / "global_experts.safetensors"))
    assert experts and all(k.startswith("experts.") for k in experts)
    rows = json.loads((run.out_dir / "metrics.json").read_text())["rows"]
    assert {r["client"] for r in rows} == {0, 1, 2, "mean"}
    # the headline is the test-size-weighted mean of the clients
    last = [r for r in rows if r["round"] == 2 and r["client"] != "mean"]
    weighted = sum(r["clean_acc"] * r["n_test"] for r in last) / sum(r["n_test"] for r in last)
    assert final["clean_acc"] == pytest.approx(weighted)
    env = json.loads((run.out_dir / "environment.json").read_text())
    assert env["seed"] == 0 and env["packages"]["flwr"].startswith("1.42")


def test_the_median_over_a_poisoned_hospital_is_the_median_of_what_each_sent(tmp_path, monkeypatch):
    """federation.aggregation=median through Flower, with client 2 rehearsing a sign-flipped update:
    the new experts are the coordinate-wise median of the three replies, so client 2's are not them."""
    cfg = demo()
    cfg.data.num_clients, cfg.train.rounds, cfg.attack.max_eval_per_client = 3, 1, 8
    cfg.federation.aggregation = "median"
    monkeypatch.setenv("MEDFEDPURE_POISON_CLIENT", "2=sign-flip*5")
    rec = run_federated(cfg, tmp_path, keep_client_arrays=True, progress=False).history[1]
    sent = [rec["clients"][c]["arrays"] for c in range(3)]
    floats = [k for k, v in rec["aggregated"].items() if v.dtype.kind == "f"]
    for key in floats:
        assert np.allclose(rec["aggregated"][key], np.median(np.stack([s[key] for s in sent]), axis=0), atol=1e-6)
    weight = next(k for k in floats if k.endswith("weight") and "running" not in k)
    assert not np.allclose(sent[2][weight], rec["aggregated"][weight])
    assert json.loads((tmp_path / "config.json").read_text())["federation"]["aggregation"] == "median"
    assert rec["aggregation"] == "median"  # the rule the server applied, in the round's record
    assert json.loads((tmp_path / "summary.json").read_text())["aggregation"] == {"rule": "median", "rounds": 1}
    from medfedpure.workflows.report import _markdown, build_tables

    assert "**Robust aggregation (MedFedPure).** Over 1 round, each round's experts are the coordinate-wise median" \
        in _markdown(build_tables(tmp_path))


def test_a_private_federation_clips_each_update_adds_noise_and_reports_its_epsilon(tmp_path):
    """federation.dp_epsilon=8 through Flower: every hospital's update leaves clipped to the norm, the
    new experts are their mean plus noise, and summary.json says what the run spent."""
    cfg = demo()
    cfg.data.num_clients, cfg.train.rounds, cfg.attack.max_eval_per_client = 3, 2, 8
    cfg.federation.dp_epsilon, cfg.federation.dp_clipping_norm = 8.0, 0.5
    history = run_federated(cfg, tmp_path, keep_client_arrays=True, progress=False).history
    for rnd in (1, 2):
        rec = history[rnd]
        floats = [k for k, v in rec["aggregated"].items() if v.dtype.kind == "f"]
        for c in range(3):
            update = [rec["clients"][c]["arrays"][k] - rec["sent_arrays"][k] for k in floats]
            assert np.sqrt(sum(float((u ** 2).sum()) for u in update)) <= 0.5 * (1 + 1e-4)
            assert rec["clients"][c]["dp_update_norm"] > 0
        mean = {k: np.mean([rec["clients"][c]["arrays"][k] for c in range(3)], axis=0) for k in floats}
        noise = np.concatenate([(rec["aggregated"][k] - mean[k]).ravel() for k in floats])
        assert np.std(noise) == pytest.approx(rec["dp"]["noise_std"], rel=0.05)
    privacy = json.loads((tmp_path / "summary.json").read_text())["privacy"]
    assert privacy["rounds"] == 2 and 7.9 <= privacy["epsilon"] <= 8.0 and privacy["delta"] == 1e-5
    assert privacy["noise_std"] == pytest.approx(privacy["noise_multiplier"] * 0.5 / 3)
