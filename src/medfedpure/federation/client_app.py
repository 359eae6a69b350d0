"""Flower ClientApp: one hospital. Experts come and go; the gate never leaves.

The experiment config arrives in each message's ConfigRecord, so the same app runs
in the simulation and on a real SuperNode.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors import safe_open

from medfedpure.config import ExperimentConfig
from medfedpure.defense.trainer import load_pretrained
from medfedpure.evaluation.defense_eval import evaluate_defense
from medfedpure.federation import task
from medfedpure.methods import baselines
from medfedpure.models import PersonalizedMoE
from medfedpure.storage import load_tensors, read_json, save_tensors, write_json

log = logging.getLogger(__name__)

GATE_KEY = "gate"  # context.state entry holding what stays: the attention nets (a baseline's own part)
ADV_KEY = "pfeddef-adversarial"  # pFedDef's current adversarial training scans

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[ExperimentConfig, int, int, str | None]:
    conf = msg.content["config"]
    cfg = ExperimentConfig.from_json(str(conf["experiment"]))
    torch.set_num_threads(max(1, cfg.federation.num_threads))
    partition = int(context.node_config["partition-id"])
    server_round = int(conf.get("server-round", 0))
    out_dir = str(conf["out-dir"]) if "out-dir" in conf else None
    return cfg, partition, server_round, out_dir


def _personal_model(cfg: ExperimentConfig, partition: int, msg: Message, context: Context,
                    out_dir: str | None = None) -> PersonalizedMoE:
    """Global experts from the message + this client's own gate from its state."""
    model = task.new_model(cfg, task.num_classes(cfg), init_seed=task.client_seed(cfg, partition))
    model.load_experts(msg.content["arrays"].to_torch_state_dict())
    resume_round = int(msg.content["config"].get("resume-round", 0))
    if GATE_KEY not in context.state and resume_round > 0:
        context.state[GATE_KEY] = ArrayRecord(_restore_gate(_client_dir(out_dir, partition), resume_round))
    if GATE_KEY in context.state:
        model.load_gate(context.state[GATE_KEY].to_torch_state_dict())
    return model


def _restore_gate(folder: Path | None, rnd: int) -> dict[str, torch.Tensor]:
    """After a restart the node's memory is empty: take the gate this client saved at round `rnd`."""
    for name in ("gate.safetensors", "gate_prev.safetensors"):
        path = folder / name if folder else None
        if path is not None and path.exists():
            with safe_open(str(path), "pt") as fh:
                if int((fh.metadata() or {}).get("round", -1)) == rnd:
                    history = folder / "history.json"
                    if history.exists():  # forget the rounds the interrupted run did not finish
                        write_json(history, [h for h in read_json(history) if h["round"] <= rnd])
                    return load_tensors(path)
    raise FileNotFoundError(f"cannot resume: no gate from round {rnd} in '{folder}'")


def _save_gate(folder: Path, gate: dict[str, torch.Tensor], rnd: int, partition: int) -> None:
    """Keep the previous round's gate beside the new one, so a run killed mid-round can resume."""
    path = folder / "gate.safetensors"
    if path.exists():
        with safe_open(str(path), "pt") as fh:
            if int((fh.metadata() or {}).get("round", -1)) != rnd:
                path.replace(folder / "gate_prev.safetensors")
    save_tensors(path, gate, {"round": str(rnd), "client": str(partition)})


def _client_dir(out_dir: str | None, partition: int) -> Path | None:
    return Path(out_dir) / "clients" / f"client_{partition:02d}" if out_dir else None


def _append_history(folder: Path | None, entry: dict) -> None:
    """The hospital's own log; it stays on the client's disk. A new run starts it afresh."""
    if folder is None:
        return
    path = folder / "history.json"
    fresh = entry["phase"] == "train" and entry["round"] == 1
    history = read_json(path) if path.exists() and not fresh else []
    history.append(entry)
    write_json(path, history)


def _rehearsed_failure(partition: int, server_round: int) -> None:
    """`MEDFEDPURE_FAIL_CLIENT=<client>@<round>[,...]` makes that client fail that round's training,
    to rehearse how the federation copes with a hospital that drops out (a test hook, off by default)."""
    for item in os.environ.get("MEDFEDPURE_FAIL_CLIENT", "").split(","):
        if item.strip() == f"{partition}@{server_round}":
            raise RuntimeError(f"client {partition} failed on purpose in round {server_round} (MEDFEDPURE_FAIL_CLIENT)")


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, partition, server_round, out_dir = _setup(msg, context)
    _rehearsed_failure(partition, server_round)
    task.set_seed(task.client_seed(cfg, partition, server_round))
    model = _personal_model(cfg, partition, msg, context, out_dir)
    gate_in = task.state_digest(model.gate_state())
    folder = _client_dir(out_dir, partition)
    if cfg.method.name == "medfedpure":
        train_loader, _, _ = task.client_loaders(cfg, partition, server_round)
        purifier = None
        if cfg.defense.purify_training:
            purifier = load_pretrained("diffusion", cfg, str(msg.content["config"]["diffusion-path"]))
        stats = task.train_local(model, train_loader, cfg, server_round, purifier)
        n_train = len(train_loader.dataset)
    else:
        stats, n_train = _train_baseline(model, cfg, partition, server_round, context, folder)

    gate = model.gate_state()
    context.state[GATE_KEY] = ArrayRecord(gate)
    if folder is not None:
        _save_gate(folder, gate, server_round, partition)
    _append_history(folder, {"round": server_round, "phase": "train", "gate_in": gate_in,
                             "gate_out": task.state_digest(gate), "n_train": n_train, **stats})
    metrics = MetricRecord({"partition-id": partition, "num-examples": n_train, **stats})
    content = RecordDict({"arrays": ArrayRecord(model.expert_state()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def _train_baseline(model, cfg: ExperimentConfig, partition: int, server_round: int, context: Context,
                    folder: Path | None) -> tuple[dict, int]:
    """One local round of a baseline (FedAvg, Local, FedEM, FAT, Local Adv, pFedDef)."""
    data, splits = task.data_and_splits(cfg)
    indices = splits[partition].train_idx
    lr = task.round_lr(cfg, server_round)
    seed = task.client_seed(cfg, partition, server_round)
    name = cfg.method.name
    if name in {"fedem", "pfeddef"}:
        adversarial = None
        if name == "pfeddef":
            share = baselines.adversarial_shares(cfg.method.adv_data_share, [len(s.train_idx) for s in splits],
                                                 cfg.method.adv_resources)[partition]
            adversarial = _pfeddef_set(model, cfg, data, indices, seed, server_round, context, folder, share)
        stats = baselines.train_fedem(model, data, indices, cfg, lr, seed, adversarial)
    else:
        share = cfg.method.adv_share if cfg.method.adversarial else 0.0
        stats = baselines.train_plain(model, data, indices, cfg, lr, seed, share)
    return stats, len(indices)


def _pfeddef_set(model, cfg: ExperimentConfig, data, indices, seed: int, server_round: int, context: Context,
                 folder: Path | None, share: float) -> baselines.AdversarialSet:
    """pFedDef's adversarial scans: made anew every Q rounds on this client's current model, else kept
    (in the node's memory, and on the client's disk for a restarted node). Every client solves the
    same resource split from the partition sizes and caps in the config, so it needs no extra message."""
    made_at = server_round - (server_round - 1) % cfg.method.adv_every
    if made_at != server_round:
        kept = _kept_adversarial(context, folder, made_at)
        if kept is not None:
            return kept
        log.warning("%s: pFedDef scans of round %d are gone (restarted node); making them again", folder, made_at)
    adv = baselines.make_adversarial_set(model, data, indices, cfg, seed, made_at, share)
    context.state[ADV_KEY] = ArrayRecord(adv.to_tensors())
    context.state[ADV_KEY + "-round"] = ConfigRecord({"round": made_at})
    if folder is not None:
        save_tensors(folder / "adversarial_scans.safetensors", adv.to_tensors(), {"round": str(made_at)})
    return adv


def _kept_adversarial(context: Context, folder: Path | None, made_at: int) -> baselines.AdversarialSet | None:
    if ADV_KEY in context.state and int(context.state[ADV_KEY + "-round"]["round"]) == made_at:
        return baselines.AdversarialSet.from_tensors(context.state[ADV_KEY].to_torch_state_dict(), made_at)
    path = folder / "adversarial_scans.safetensors" if folder else None
    if path is None or not path.exists():
        return None
    with safe_open(str(path), "pt") as fh:
        if int((fh.metadata() or {}).get("round", -1)) != made_at:
            return None
    adv = baselines.AdversarialSet.from_tensors(load_tensors(path), made_at)
    context.state[ADV_KEY] = ArrayRecord(adv.to_tensors())
    context.state[ADV_KEY + "-round"] = ConfigRecord({"round": made_at})
    return adv


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, partition, server_round, out_dir = _setup(msg, context)
    model = _personal_model(cfg, partition, msg, context, out_dir)
    _, test_loader, _ = task.client_loaders(cfg, partition, server_round)
    with_attack = cfg.attack.eval_every_round or bool(msg.content["config"].get("final", False))
    result = task.test_local(model, test_loader, cfg, seed=task.client_seed(cfg, partition, server_round),
                             with_attack=with_attack)
    _append_history(_client_dir(out_dir, partition),
                    {"round": server_round, "phase": "evaluate", "gate": task.state_digest(model.gate_state()),
                     **result})
    result["num-examples"] = result.pop("n_test")
    metrics = MetricRecord({"partition-id": partition, **result})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.query()
def defend(msg: Message, context: Context) -> Message:
    """Final defended evaluation on this client's test split, with its own gate and calibration."""
    cfg, partition, server_round, out_dir = _setup(msg, context)
    conf = msg.content["config"]
    model = _personal_model(cfg, partition, msg, context, out_dir).eval()
    mae = load_pretrained("mae", cfg, str(conf["mae-path"]))
    diffusion = load_pretrained("diffusion", cfg, str(conf["diffusion-path"]))
    _, test_loader, _ = task.client_loaders(cfg, partition)
    seed = task.client_seed(cfg, partition, 10_000)
    d = cfg.defense
    metrics, examples, calibration = evaluate_defense(model, mae, diffusion, task.validation_loader(cfg, partition), test_loader,
                                         task.make_attack(model, cfg, seed), d,
                                         list(d.eval_detectors), list(d.eval_modes), seed,
                                         figure=(d.detector, d.mode if d.mode != "off" else "graded"))
    folder = _client_dir(out_dir, partition)
    if folder is not None:
        write_json(folder / "defense.json", metrics)
        # tau and the clean scores behind it stay with this hospital's models
        save_tensors(folder / "detector_calibration.safetensors", calibration,
                     {"target_fpr": str(d.target_fpr), "rule": d.rule,
                      **{f"tau.{name}": str(metrics[f"{name}.tau"]) for name in calibration}})
        if partition == 0 and examples:
            from medfedpure.reporting.plots import plot_defense_examples
            plot_defense_examples(examples, Path(out_dir) / "defense_examples.png",
                                  f"client 0: {d.detector} detector, {d.mode} mode")
    n_test = int(metrics.pop("n_test"))
    record = MetricRecord({"partition-id": partition, "num-examples": n_test, **metrics})
    return Message(content=RecordDict({"metrics": record}), reply_to=msg)
