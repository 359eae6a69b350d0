"""Flower ClientApp: one hospital. Experts come and go; the gate never leaves.

The experiment config arrives in each message's ConfigRecord, so the same app runs in the
simulation and on a real SuperNode. On a SuperNode the node config names the hospital
(`partition-id`), its own class folders (`data-dir`) and where it keeps its state (`state-dir`).
What a round does is the method's (`methods`); what the hospital keeps between rounds is
`client_state`'s. Messages with the `pretrain` action train the defense models (phases 1-2),
those with the `finetune` action fine-tune the U-Net against the hospital's classifier (phase 4).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medfedpure.attacks import make_pgd
from medfedpure.config import ExperimentConfig
from medfedpure.defense.evaluation import evaluate_defense
from medfedpure.defense.finetune import evaluate_purifier, finetune_purifier
from medfedpure.defense.trainer import PHASES, build_pretrained, eval_loss, train_epochs
from medfedpure.federation.client_state import HospitalState
from medfedpure.federation.privacy import KEY_CLIPPING_NORM, clip_update
from medfedpure.methods import LocalRound, fingerprint, method_of, new_model, task
from medfedpure.reporting.plots import plot_defense_examples
from medfedpure.runfolder import CALIBRATION, client_dir
from medfedpure.storage import save_tensors, write_json

app = ClientApp()


def _config(msg: Message, context: Context) -> tuple[ExperimentConfig, int, int, str]:
    """The run's config as this hospital sees it (on a SuperNode with a `data-dir`, its own folder),
    its partition, the server round, and the run's tag (its fingerprint, taken before the node's
    own folder replaces the data root)."""
    conf = msg.content["config"]
    cfg = ExperimentConfig.from_json(str(conf["experiment"]))
    run = fingerprint(cfg, "train")
    torch.set_num_threads(max(1, cfg.federation.num_threads))
    node = context.node_config
    if "data-dir" in node:
        cfg.data.layout, cfg.data.root = "hospital", str(node["data-dir"])
    return cfg, int(node["partition-id"]), int(conf.get("server-round", 0)), run


def _setup(msg: Message, context: Context) -> tuple[ExperimentConfig, int, int, HospitalState]:
    cfg, partition, server_round, run = _config(msg, context)
    return cfg, partition, server_round, HospitalState(context, _state_folder(msg, context, partition), partition, run)


def _state_folder(msg: Message, context: Context, partition: int) -> Path | None:
    if "state-dir" in context.node_config:
        return Path(str(context.node_config["state-dir"]))
    conf = msg.content["config"]
    return client_dir(str(conf["out-dir"]), partition) if "out-dir" in conf else None


def _personal_model(cfg: ExperimentConfig, partition: int, msg: Message, state: HospitalState, up_to_round: int,
                    experts: str = "arrays"):
    """Global experts from the message (its `experts` record) + this client's own gate (the latest by
    `up_to_round`)."""
    model = new_model(cfg, task.num_classes(cfg), init_seed=task.client_seed(cfg, partition))
    model.load_experts(msg.content[experts].to_torch_state_dict())
    gate = state.gate(up_to_round)
    if gate is not None:
        model.load_gate(gate)
    return model


def _defense_model(name: str, cfg: ExperimentConfig, msg: Message) -> torch.nn.Module:
    """The federation's MAE or U-Net, sent by the server with the message (trained in phases 1-2)."""
    return build_pretrained(name, cfg, msg.content[name].to_torch_state_dict(), f"the server's {name} weights")


def _rehearsed_failure(partition: int, server_round: int | str) -> None:
    """`MEDFEDPURE_FAIL_CLIENT=<client>@<round>[,...]` makes that client fail that round's training
    (`<client>@defense`: the defended evaluation), to rehearse how the federation copes with a hospital
    that drops out (a test hook, off by default)."""
    for item in os.environ.get("MEDFEDPURE_FAIL_CLIENT", "").split(","):
        if item.strip() == f"{partition}@{server_round}":
            raise RuntimeError(f"client {partition} failed on purpose in round {server_round} (MEDFEDPURE_FAIL_CLIENT)")


POISONS = {"sign-flip": 1.0, "scale": 10.0, "noise": 1.0}  # rehearsed poisoning, and each kind's default factor


def poison_plan(partition: int) -> tuple[str, float] | None:
    """`MEDFEDPURE_POISON_CLIENT=<client>=<kind>[*<factor>][,...]` makes that hospital send poisoned
    experts every round, to rehearse a compromised or broken one (a test hook, off by default):
    `sign-flip` sends the global weights minus factor x its update, `scale` plus factor x its update
    (default 10: a model-replacement boost), `noise` Gaussian noise of factor x each tensor's spread in
    place of its weights. This hospital's (kind, factor), or None; every entry is checked first."""
    plan = None
    for item in filter(None, (i.strip() for i in os.environ.get("MEDFEDPURE_POISON_CLIENT", "").split(","))):
        who, _, what = item.partition("=")
        kind, _, factor = what.partition("*")
        try:
            f = float(factor) if factor else POISONS[kind]
            ok = kind in POISONS and who.strip().isdigit() and math.isfinite(f)
        except (KeyError, ValueError):
            ok = False
        if not ok:
            raise RuntimeError(f"MEDFEDPURE_POISON_CLIENT: '{item}' is not <client>=<kind>[*<factor>] with a kind "
                               f"of {', '.join(POISONS)} and a finite factor")
        if int(who) == partition and plan is None:
            plan = (kind, f)
    return plan


def rehearsed_poison(plan: tuple[str, float] | None, partition: int, server_round: int, sent: ArrayRecord,
                     shared: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The experts this hospital sends under its `poison_plan` (`sent`: the global ones it received),
    on the CPU. Norm statistics (`running_*`) and integer buffers are sent as trained."""
    if plan is None:
        return shared
    kind, f = plan
    sent = sent.to_torch_state_dict()
    noise = torch.Generator().manual_seed(1_000_003 * partition + server_round)
    out = {}
    for key, w in shared.items():
        w = w.detach().cpu()
        if not w.is_floating_point() or ".running_" in key or key not in sent:
            out[key] = w
        elif kind == "noise":
            out[key] = f * w.std(unbiased=False) * torch.randn(w.shape, generator=noise, dtype=w.dtype)
        else:
            g = sent[key].to(w.dtype)
            out[key] = g + (f if kind == "scale" else -f) * (w - g)
    return out


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, partition, server_round, state = _setup(msg, context)
    _rehearsed_failure(partition, server_round)
    poison = poison_plan(partition)  # checked before the round's training, not after
    method = method_of(cfg)
    task.set_seed(task.client_seed(cfg, partition, server_round))
    model = _personal_model(cfg, partition, msg, state, server_round - 1)
    gate_in = task.state_digest(method.own_state(model))
    purifier = None
    if cfg.defense.purify_training:  # the experts train through the purifier (MedFedPure only)
        purifier = _defense_model("diffusion", cfg, msg)
    stats, n_train = method.train_round(model, LocalRound(cfg, partition, server_round, purifier, state))
    gate = method.own_state(model)
    state.save_gate(gate, server_round)
    state.append_history({"round": server_round, "phase": "train", "gate_in": gate_in,
                          "gate_out": task.state_digest(gate), "n_train": n_train, **stats})
    metrics = MetricRecord({"partition-id": partition, "num-examples": n_train, **stats})
    shared = rehearsed_poison(poison, partition, server_round, msg.content["arrays"], method.shared_state(model))
    return private_reply(msg, shared, metrics)


def private_reply(msg: Message, arrays: dict[str, torch.Tensor], metrics: MetricRecord) -> Message:
    """The reply to a training message: `arrays` and `metrics`, the update clipped before it leaves
    where the server asks for differential privacy (its clipping norm in the message's config)."""
    clipping_norm = msg.content["config"].get(KEY_CLIPPING_NORM)
    if clipping_norm is not None:
        sent = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        clipped, norm = clip_update(sent, {k: v.detach().cpu().numpy() for k, v in arrays.items()},
                                    float(clipping_norm))
        arrays = {k: torch.from_numpy(v) for k, v in clipped.items()}
        metrics["dp-weight"], metrics["dp_update_norm"] = 1, norm
    return Message(content=RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, partition, server_round, state = _setup(msg, context)
    model = _personal_model(cfg, partition, msg, state, server_round)
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
    cfg, partition, server_round, state = _setup(msg, context)
    _rehearsed_failure(partition, "defense")
    model = _personal_model(cfg, partition, msg, state, server_round).eval()
    mae, diffusion = _defense_model("mae", cfg, msg), _defense_model("diffusion", cfg, msg)
    _, test_loader, _ = task.client_loaders(cfg, partition)
    seed = task.client_seed(cfg, partition, purpose="defense")
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
    save_tensors(folder / CALIBRATION, calibration,
                 {"target_fpr": str(d.target_fpr), "rule": d.rule,
                  **{f"tau.{name}": str(metrics[f"{name}.tau"]) for name in calibration}})


# --------------------------------------------------------------------------- phases 1-2
def _pretrain_setup(msg: Message, context: Context):
    cfg, partition, server_round, _ = _config(msg, context)
    phase = PHASES[str(msg.content["config"]["phase"])]
    model = phase.build(cfg).to(cfg.device)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return cfg, phase, partition, server_round, model


@app.train("pretrain")
def pretrain(msg: Message, context: Context) -> Message:
    """Train the whole MAE or U-Net on this hospital's clean scans; the server averages them."""
    cfg, phase, partition, server_round, model = _pretrain_setup(msg, context)
    task.set_seed(task.client_seed(cfg, partition, server_round))  # augmentation draws from the global RNG
    settings = phase.settings(cfg)
    loader = task.client_loaders(cfg, partition, server_round, batch_size=settings.batch_size)[0]
    loss = train_epochs(phase, model, loader, settings.local_epochs, settings.lr, cfg.device,
                        seed=task.client_seed(cfg, partition, server_round))
    metrics = MetricRecord({"partition-id": partition, "num-examples": len(loader.dataset), "train_loss": loss})
    return private_reply(msg, model.state_dict(), metrics)


@app.evaluate("pretrain")
def pretrain_loss(msg: Message, context: Context) -> Message:
    cfg, phase, partition, server_round, model = _pretrain_setup(msg, context)
    test_loader = task.client_loaders(cfg, partition, server_round)[1]
    loss = eval_loss(phase, model, test_loader, cfg.device)
    metrics = MetricRecord({"partition-id": partition, "num-examples": len(test_loader.dataset), "test_loss": loss})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


# --------------------------------------------------------------------------- phase 4


def _finetune_setup(msg: Message, context: Context):
    """(config, partition, round, the U-Net from the message, this hospital's classifier: the phase-3
    experts sent beside it and its own last gate)."""
    cfg, partition, server_round, state = _setup(msg, context)
    diffusion = build_pretrained("diffusion", cfg, msg.content["arrays"].to_torch_state_dict(), "the server's U-Net")
    if state.gate(cfg.train.rounds) is None:  # not a fresh gate: the U-Net would learn the wrong classifier
        raise RuntimeError(f"client {partition} has no gate from phase 3 (its state folder or context lost it): "
                           "phase 4 fine-tunes against the hospital's own classifier")
    classifier = _personal_model(cfg, partition, msg, state, cfg.train.rounds, experts="experts").eval()
    return cfg, partition, server_round, diffusion, classifier


@app.train("finetune")
def finetune(msg: Message, context: Context) -> Message:
    """Fine-tune the U-Net so that this hospital's classifier answers right behind it (defense.purifier)."""
    cfg, partition, server_round, diffusion, classifier = _finetune_setup(msg, context)
    seed = task.client_seed(cfg, partition, server_round, "finetune")
    task.set_seed(seed)  # augmentation draws from the global RNG
    loader = task.client_loaders(cfg, partition, server_round, batch_size=cfg.defense.purifier.batch_size)[0]
    stats = finetune_purifier(diffusion.train(), classifier, loader, cfg, seed)
    metrics = MetricRecord({"partition-id": partition, "num-examples": len(loader.dataset),
                            **{f"train_{k}": v for k, v in stats.items()}})
    return private_reply(msg, diffusion.state_dict(), metrics)


@app.evaluate("finetune")
def finetune_loss(msg: Message, context: Context) -> Message:
    cfg, partition, _, diffusion, classifier = _finetune_setup(msg, context)
    test_loader = task.client_loaders(cfg, partition)[1]
    stats = evaluate_purifier(diffusion, classifier, test_loader, cfg, seed=task.client_seed(cfg, partition, purpose="finetune"))
    metrics = MetricRecord({"partition-id": partition, "num-examples": len(test_loader.dataset),
                            **{f"test_{k}": v for k, v in stats.items()}})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
