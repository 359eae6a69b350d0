"""Flower ClientApp for phases 1-2: each hospital trains the whole MAE or U-Net on its own
clean scans; the server averages them (plain FedAvg). Scans never leave the client."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medfedpure.config import ExperimentConfig
from medfedpure.defense.trainer import PHASES, eval_loss, train_epochs
from medfedpure.methods import task

app = ClientApp()


def _setup(msg: Message, context: Context):
    conf = msg.content["config"]
    cfg = ExperimentConfig.from_json(str(conf["experiment"]))
    torch.set_num_threads(max(1, cfg.federation.num_threads))
    phase = PHASES[str(conf["phase"])]
    partition = int(context.node_config["partition-id"])
    model = phase.build(cfg).to(cfg.device)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return cfg, phase, partition, int(conf.get("server-round", 0)), model


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, phase, partition, server_round, model = _setup(msg, context)
    task.set_seed(task.client_seed(cfg, partition, server_round))  # augmentation draws from the global RNG
    settings = phase.settings(cfg)
    loader = task.client_loaders(cfg, partition, server_round, batch_size=settings.batch_size)[0]
    loss = train_epochs(phase, model, loader, settings.local_epochs, settings.lr, cfg.device,
                        seed=task.client_seed(cfg, partition, server_round))
    metrics = MetricRecord({"partition-id": partition, "num-examples": len(loader.dataset), "train_loss": loss})
    return Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, phase, partition, server_round, model = _setup(msg, context)
    test_loader = task.client_loaders(cfg, partition, server_round)[1]
    loss = eval_loss(phase, model, test_loader, cfg.device)
    metrics = MetricRecord({"partition-id": partition, "num-examples": len(test_loader.dataset), "test_loss": loss})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
