"""Flower ClientApp: one hospital. Experts come and go; the gate never leaves.

The experiment config arrives in each message's ConfigRecord, so the same app runs in the
simulation and on a real SuperNode. What a round does is the method's (`methods`); what the
hospital keeps between rounds is `client_state`'s.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medfedpure.attacks import make_pgd
from medfedpure.config import ExperimentConfig
from medfedpure.defense.evaluation import evaluate_defense
from medfedpure.defense.trainer import load_pretrained
from medfedpure.federation.client_state import HospitalState
from medfedpure.methods import LocalRound, method_of, new_model, task
from medfedpure.reporting.plots import plot_defense_examples
from medfedpure.runfolder import client_dir
from medfedpure.storage import save_tensors, write_json

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[ExperimentConfig, int, int, HospitalState]:
    conf = msg.content["config"]
    cfg = ExperimentConfig.from_json(str(conf["experiment"]))
    torch.set_num_threads(max(1, cfg.federation.num_threads))
    partition = int(context.node_config["partition-id"])
    folder = client_dir(str(conf["out-dir"]), partition) if "out-dir" in conf else None
    return cfg, partition, int(conf.get("server-round", 0)), HospitalState(context, folder, partition)


def _personal_model(cfg: ExperimentConfig, partition: int, msg: Message, state: HospitalState):
    """Global experts from the message + this client's own gate from its state."""
    model = new_model(cfg, task.num_classes(cfg), init_seed=task.client_seed(cfg, partition))
    model.load_experts(msg.content["arrays"].to_torch_state_dict())
    gate = state.gate(int(msg.content["config"].get("resume-round", 0)))
    if gate is not None:
        model.load_gate(gate)
    return model


def _rehearsed_failure(partition: int, server_round: int) -> None:
    """`MEDFEDPURE_FAIL_CLIENT=<client>@<round>[,...]` makes that client fail that round's training,
    to rehearse how the federation copes with a hospital that drops out (a test hook, off by default)."""
    for item in os.environ.get("MEDFEDPURE_FAIL_CLIENT", "").split(","):
        if item.strip() == f"{partition}@{server_round}":
            raise RuntimeError(f"client {partition} failed on purpose in round {server_round} (MEDFEDPURE_FAIL_CLIENT)")


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, partition, server_round, state = _setup(msg, context)
    _rehearsed_failure(partition, server_round)
    method = method_of(cfg)
    task.set_seed(task.client_seed(cfg, partition, server_round))
    model = _personal_model(cfg, partition, msg, state)
    gate_in = task.state_digest(method.own_state(model))
    purifier = None
    if cfg.defense.purify_training:  # the experts train through the purifier (MedFedPure only)
        purifier = load_pretrained("diffusion", cfg, str(msg.content["config"]["diffusion-path"]))
    stats, n_train = method.train_round(model, LocalRound(cfg, partition, server_round, purifier, state))
    gate = method.own_state(model)
    state.save_gate(gate, server_round)
    state.append_history({"round": server_round, "phase": "train", "gate_in": gate_in,
                          "gate_out": task.state_digest(gate), "n_train": n_train, **stats})
    metrics = MetricRecord({"partition-id": partition, "num-examples": n_train, **stats})
    content = RecordDict({"arrays": ArrayRecord(method.shared_state(model)), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, partition, server_round, state = _setup(msg, context)
    model = _personal_model(cfg, partition, msg, state)
    _, test_loader, _ = task.client_loaders(cfg, partition, server_round)
    with_attack = cfg.attack.eval_every_round or bool(msg.content["config"].get("final", False))
    result = task.test_local(model, test_loader, cfg, seed=task.client_seed(cfg, partition, server_round),
                             with_attack=with_attack)
    state.append_history({"round": server_round, "phase": "evaluate",
                          "gate": task.state_digest(method_of(cfg).own_state(model)), **result})
    result["num-examples"] = result.pop("n_test")
    metrics = MetricRecord({"partition-id": partition, **result})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.query()
def defend(msg: Message, context: Context) -> Message:
    """Final defended evaluation on this client's test split, with its own gate and calibration."""
    cfg, partition, _, state = _setup(msg, context)
    conf = msg.content["config"]
    model = _personal_model(cfg, partition, msg, state).eval()
    mae = load_pretrained("mae", cfg, str(conf["mae-path"]))
    diffusion = load_pretrained("diffusion", cfg, str(conf["diffusion-path"]))
    _, test_loader, _ = task.client_loaders(cfg, partition)
    seed = task.client_seed(cfg, partition, 10_000)
    d = cfg.defense
    metrics, examples, calibration = evaluate_defense(
        model, mae, diffusion, task.validation_loader(cfg, partition), test_loader, make_pgd(model, cfg.attack, seed),
        d, list(d.eval_detectors), list(d.eval_modes), seed,
        figure=(d.detector, d.mode if d.mode != "off" else "graded"))
    if state.folder is not None:
        _keep_defense(state.folder, cfg, metrics, calibration)
        if partition == 0 and examples:
            plot_defense_examples(examples, state.folder.parent.parent / "defense_examples.png",
                                  f"client 0: {d.detector} detector, {d.mode} mode")
    n_test = int(metrics.pop("n_test"))
    record = MetricRecord({"partition-id": partition, "num-examples": n_test, **metrics})
    return Message(content=RecordDict({"metrics": record}), reply_to=msg)


def _keep_defense(folder: Path, cfg: ExperimentConfig, metrics: dict, calibration: dict) -> None:
    """The hospital's defended figures, and tau with the clean scores behind it, stay with its models."""
    d = cfg.defense
    write_json(folder / "defense.json", metrics)
    save_tensors(folder / "detector_calibration.safetensors", calibration,
                 {"target_fpr": str(d.target_fpr), "rule": d.rule,
                  **{f"tau.{name}": str(metrics[f"{name}.tau"]) for name in calibration}})
