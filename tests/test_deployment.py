"""Flower's deployment runtime on loopback: a SuperLink with TLS and SuperNode authentication, one
SuperNode per hospital on its own folder, the same ServerApp/ClientApp code as the simulation."""

import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from medfedpure.config import ConfigError, apply_overrides
from medfedpure.data import DataError
from medfedpure.federation.client_state import HospitalState
from medfedpure.methods import task
from medfedpure.runfolder import client_dir
from medfedpure.storage import read_json
from medfedpure.workflows.deploy_local import LocalFederation, deploy_local, hospital_config
from medfedpure.workflows.deployment import config_from_run
from medfedpure.workflows.training import run_federated

from conftest import demo


TINY = ["data.synthetic_per_class=40", "train.rounds=2", "train.local_epochs=1", "defense.enabled=false",
        "attack.steps=2", "attack.max_eval_per_client=4"]


def tiny(*extra: str):
    return demo(*TINY, *extra).validate()


# --------------------------------------------------------------------------- hospital folders (fast)
def test_each_hospital_folder_gives_the_split_the_simulation_makes(tmp_path):
    cfg = tiny()
    pooled, splits = task.data_and_splits(cfg)
    hcfg = hospital_config(cfg, tmp_path, progress=False)
    assert hcfg.data.layout == "hospitals" and hcfg.data.classes == list(pooled.classes)
    for i, split in enumerate(splits):
        own = replace_layout(hcfg, i)
        data, mine = task.hospital(own, i)
        for part in ("train_idx", "val_idx", "test_idx"):  # the same scans (grouped by class on disk)
            assert same_scans(data, getattr(mine, part), pooled, getattr(split, part))
    joined, jsplits = task.data_and_splits(hcfg)  # the simulation reading the hospitals' folders
    for i, (split, jsplit) in enumerate(zip(splits, jsplits)):
        assert same_scans(joined, jsplit.test_idx, pooled, split.test_idx)
        data, mine = task.hospital(replace_layout(hcfg, i), i)
        assert np.array_equal(joined.images[jsplit.train_idx], data.images[mine.train_idx])
    assert hospital_config(cfg, tmp_path, progress=False).data.root == hcfg.data.root  # same cut: reused
    with pytest.raises(DataError, match="does not hold this cut"):
        hospital_config(tiny("seed=1"), tmp_path, progress=False)


def same_scans(a, a_idx, b, b_idx) -> bool:
    return all(np.array_equal(a.images[a_idx][a.labels[a_idx] == c], b.images[b_idx][b.labels[b_idx] == c])
               for c in range(len(a.classes))) and len(a_idx) == len(b_idx)


def replace_layout(cfg, i):
    own = apply_overrides(cfg, [])
    own.data.layout, own.data.root = "hospital", str(Path(cfg.data.root) / f"hospital-{i}")
    return own


def test_a_hospital_folder_with_other_classes_or_none_gets_one_error_naming_it(tmp_path):
    hcfg = hospital_config(tiny(), tmp_path, progress=False)
    folder = Path(hcfg.data.root) / "hospital-1"
    extra = folder / "meningioma"
    extra.mkdir()
    own = replace_layout(hcfg, 1)
    with pytest.raises(DataError, match=r"hospital-1.*meningioma.*federation's classes"):
        task.hospital(own, 1)
    extra.rmdir()
    missing = replace_layout(hcfg, 1)
    missing.data.root = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        task.hospital(missing, 1)
    wrong_count = apply_overrides(hcfg, ["data.num_clients=4"])
    with pytest.raises(DataError, match="hospital-3"):
        task.data_and_splits(wrong_count)


def test_the_run_config_names_the_experiment_and_a_bad_one_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="quote the names"):
        config_from_run({"preset": "demo", "overrides": "data.classes=[no,yes]", "out-dir": "x"})
    cfg, out = config_from_run({"preset": "demo", "overrides": "train.rounds=3; data.classes=['no','yes']",
                                "out-dir": str(tmp_path / "run")})
    assert cfg.train.rounds == 3 and cfg.data.classes == ["no", "yes"] and out == tmp_path / "run"
    assert cfg.data.layout == "hospital"  # the server has no scans; every SuperNode reads its data-dir
    br35h, _ = config_from_run({"preset": "br35h-cpu", "overrides": "", "out-dir": "x"})
    assert br35h.data.classes == ["no", "yes"] and br35h.data.root is None
    with pytest.raises(ConfigError, match="train.roundz"):
        config_from_run({"preset": "demo", "overrides": "train.roundz=3", "out-dir": "x"})
    with pytest.raises(ValueError, match="out-dir"):
        config_from_run({"preset": "demo", "overrides": "", "out-dir": ""})


def test_a_restarted_node_takes_its_latest_saved_gate_of_this_run_never_another_runs(tmp_path):
    gate = {"attention.w": torch.arange(4.0)}

    def fresh_node(run="run-a"):
        return HospitalState(Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                             tmp_path, 0, run)

    first = fresh_node()
    first.save_gate(gate, 1)
    first.save_gate({"attention.w": gate["attention.w"] + 1}, 2)
    assert fresh_node().gate(0) is None  # round 1 of a run starts with a fresh gate
    assert torch.equal(fresh_node().gate(1)["attention.w"], gate["attention.w"])  # missed round 2
    assert torch.equal(fresh_node().gate(5)["attention.w"], gate["attention.w"] + 1)
    assert fresh_node("run-b").gate(5) is None
    # a hospital that trained round 2 and lost that round's gate is refused, not given round 1's
    node = fresh_node()
    for rnd in (1, 2):
        node.append_history({"round": rnd, "phase": "train"})
    (tmp_path / "gate.safetensors").unlink()
    with pytest.raises(RuntimeError, match="trained round 2 but its gate"):
        fresh_node().gate(2)
    assert torch.equal(fresh_node().gate(1)["attention.w"], gate["attention.w"])  # resuming after round 1: fine


# --------------------------------------------------------------------------- deployment on loopback (slow)
def _received_keys(out: Path) -> set[str]:
    history = read_json(out / "checkpoints" / "train.json")["state"]["history"]
    return {k for rec in history.values() for c in rec["clients"].values() for k in c["received_keys"]}


@pytest.mark.slow
def test_deployment_with_tls_and_node_auth_equals_the_simulation_round_by_round(tmp_path, monkeypatch):
    # two hospitals, with differential privacy on (a small noise multiplier, so that the model still
    # learns): the hospitals clip on their own machines and the server's seeded noise is the simulation's too;
    # hospital 1 rehearses a poisoned update (sign-flipped, which its clipping keeps) on both runtimes: the
    # SuperNode's ClientApp must apply it as the simulation's does, or the metrics part
    monkeypatch.setenv("MEDFEDPURE_POISON_CLIENT", "1=sign-flip")
    cfg = tiny("data.num_clients=2", "federation.dp_noise_multiplier=0.05", "federation.dp_clipping_norm=5")
    out = tmp_path / "deploy"
    summary = deploy_local(cfg, out, progress=False, timeout_s=900)
    assert summary["final"]["round"] == 2 and not summary["failures"]
    assert summary["privacy"]["rounds"] == 2 and summary["privacy"]["epsilon"] > 0
    sim = run_federated(read_config(out), tmp_path / "simulation", progress=False)
    assert (out / "metrics.csv").read_text() == (sim.out_dir / "metrics.csv").read_text()
    assert read_json(sim.out_dir / "summary.json")["privacy"] == summary["privacy"]
    assert "Differential privacy" in (out / "tables.md").read_text()
    keys = _received_keys(out)
    assert keys and all(k.startswith("experts.") for k in keys)  # what the server received: experts only
    for i in range(2):  # each hospital's gate stayed on its own disk
        assert (client_dir(out, i) / "gate.safetensors").is_file()


def read_config(out: Path):
    from medfedpure.config import ExperimentConfig
    return ExperimentConfig.from_dict(read_json(out / "config.json"))


def _rounds_done(out: Path) -> int:
    path = out / "checkpoints" / "train.json"
    return int(read_json(path)["round"]) if path.is_file() else 0


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.mark.slow
def test_a_supernode_killed_in_round_2_is_left_out_and_rejoins_with_its_saved_gate(tmp_path):
    out = tmp_path / "deploy"
    # two hospitals (each one's ClientApp processes cost seconds on 2 cores); a lost hospital is waited
    # for 15 s before each round (default 30): round 2 goes on without it, and round 3 has it back (its
    # SuperNode restarts in a few seconds); the experts are combined by a robust rule (the coordinate-wise
    # median) on this runtime too
    cfg = hospital_config(tiny("data.num_clients=2", "train.rounds=3", "federation.rejoin_wait_s=15",
                               "federation.aggregation=median"), out, progress=False)
    folder = lambda i: Path(cfg.data.root) / f"hospital-{i}"  # noqa: E731
    with LocalFederation(out, 2) as fed:
        fed.prepare()
        fed.start_superlink()
        for i in range(2):
            fed.register(i)
            fed.start_supernode(i, folder(i), client_dir(out, i))
        run = fed.run_app({"experiment-json": cfg.to_json(), "out-dir": str(out)})
        _wait(lambda: _rounds_done(out) >= 1, 300, "round 1")
        fed.stop("supernode-1", signal.SIGKILL)  # the hospital's machine dies, with its ClientApp
        _wait(lambda: _rounds_done(out) >= 2, 300, "round 2 without hospital 1")
        fed.start_supernode(1, folder(1), client_dir(out, 1))
        assert run.wait(timeout=600) == 0
    summary = read_json(out / "summary.json")
    assert summary["final"]["round"] == 3
    missed = {(f["round"], f["client"]) for f in summary["failures"]}
    assert (2, 1) in missed and all(rnd == 2 for rnd, _ in missed)
    history = read_json(client_dir(out, 1) / "history.json")
    trained = {h["round"]: h for h in history if h["phase"] == "train"}
    assert sorted(trained) == [1, 3]
    assert trained[3]["gate_in"] == trained[1]["gate_out"]  # the gate it saved, not a fresh one
    assert trained[3]["gate_in"] != trained[1]["gate_in"]
    assert "1" in {str(r["client"]) for r in summary["clients"]}  # and answered the last round
    history = read_json(out / "checkpoints" / "train.json")["state"]["history"]
    assert [history[r]["aggregation"] for r in sorted(history)] == ["median"] * 3
    assert summary["aggregation"] == {"rule": "median", "rounds": 3}


@pytest.mark.slow
def test_an_unregistered_key_and_a_plaintext_node_cannot_join_the_tls_superlink(tmp_path):
    out = tmp_path / "deploy"
    with LocalFederation(out, 3) as fed:
        fed.prepare()
        fed.start_superlink()
        fed.register(2)  # the control: a registered node joins
        fed.start_supernode(2, out, out / "state2")
        fed.start_supernode(0, out, out / "state0")  # its key was never registered
        plain = fed.start("plaintext", [fed.processes["supernode-0"].args[0], "--superlink", f"127.0.0.1:{fed.port}",
                                        "--insecure", "--node-config", "partition-id=1", "--port",
                                        str(fed.node_ports[1]), "--max-retries", "3", "--max-wait-time", "15"])
        unregistered = fed.processes["supernode-0"]
        _wait(lambda: unregistered.poll() is not None and plain.poll() is not None, 90, "both nodes to give up")
        assert unregistered.returncode != 0 and plain.returncode != 0
        assert "Failed to activate SuperNode" in (out / "logs" / "supernode-0.log").read_text()
        assert "could not establish a connection" in (out / "logs" / "plaintext.log").read_text()
        _wait(lambda: "online" in fed.flwr(["supernode", "list", fed.connection], "list"), 60, "the registered node")
        listing = fed.flwr(["supernode", "list", fed.connection], "list")
        assert listing.count("online") == 1
        assert fed.processes["supernode-2"].poll() is None


def test_a_wait_for_hospitals_says_what_it_waits_for(caplog):
    import logging

    from medfedpure.federation.server_app import wait_for_nodes
    from medfedpure.federation.strategy import FederationError

    class Grid:  # two of three hospitals connected
        def get_node_ids(self):
            return [11, 12]

    with caplog.at_level(logging.INFO, logger="medfedpure.federation.server_app"):
        assert wait_for_nodes(Grid(), 3, timeout_s=0.2, needed=2) == [11, 12]
    said = caplog.text
    assert "waiting up to 0 s for 1 more of 3 hospitals (2 connected, 2 needed)" in said and "going on without" in said
    with pytest.raises(FederationError, match="only 2 of 3"):
        wait_for_nodes(Grid(), 3, timeout_s=0.2, needed=3)
