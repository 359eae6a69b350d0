"""MedFedPure benchmarks: one command, one JSON.

    python benchmarks/run.py [--preset br35h-cpu] [--device cpu|cuda] [--out benchmarks/results.json] [--compile]
                             [--only SECTION,...] [section.field=value ...]

Measures, on random [0,1] images at the preset's resolution (no dataset needed, except for the
realistic Flower round, which reads Br35H from --br35h and is skipped without it): the defense
as the preset ships it (per stage, clean and flagged, ratio to the bare classifier, default and
channels-last layout, with --compile also torch.compile, and the cost of a gradient through it) and
the other defense settings compared with it; local-training throughput; Flower overhead (the same
local work with and without the Flower simulation: the tiny demo and two br35h-cpu rounds; and
what one message with the experts costs); the MAE detector in selective mode (the paper's
configuration) for clean vs flagged scans and its ratio to the bare classifier; purification
latency per sampler and step count; PGD cost; the deployment runtime against the simulation
(wall-time ratio, bytes per round per hospital); and peak RSS. Untrained weights: speed does not depend on them.

Where the research loop's time goes: `defended_gradient` (one gradient through the shipped defense, by
stage, as the old `.backward()` and as an attack takes it, and per draw of an EOT step) and
`experiment_breakdown` (the br35h-cpu experiment by phase and stage, each stage timed on one hospital
and multiplied out; phase 3 with PGD-k and with N-FGSM adversarial training, the PGD evaluation every
round and in the final round only). `--only` runs some sections and keeps the others' figures from
--out; `measured` says when each section was measured. Overrides (`model.width=32`, as the CLI takes them)
change the preset for the sections that use it (not the Flower and deployment runs, which build their own):
a candidate configuration is measured into another --out, and results.json keeps the shipped default's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from medfedpure.attacks import make_pgd, training_attack_label
from medfedpure.config import ConfigError, ExperimentConfig, apply_overrides, load_preset
from medfedpure.defense import DefendedClassifier, MAEDetector, build_diffusion, build_mae
from medfedpure.methods import new_model, task
from medfedpure.methods.medfedpure import moe_optimizer, train_local
from medfedpure.storage import read_json, write_json


def _timed(fn, repeat: int = 3) -> float:
    """Median seconds of `repeat` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_training(cfg, device: str, batch: int = 32, steps: int = 5) -> dict:
    model = new_model(cfg, 2, 0).to(device).train()
    opt = moe_optimizer(model, cfg, cfg.train.lr)
    x = torch.rand(batch, 3, cfg.data.image_size, cfg.data.image_size, device=device)
    y = torch.randint(0, 2, (batch,), device=device)

    def run():
        for _ in range(steps):
            loss, _ = model.loss(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        _sync(device)

    seconds = _timed(run, repeat=2)
    return {"images_per_s": round(batch * steps / seconds, 1), "batch": batch,
            "model": f"K={cfg.model.num_experts} x {cfg.model.backbone} @ {cfg.data.image_size}px"}


def bench_inference(cfg, device: str, n: int = 32) -> dict:
    size = cfg.data.image_size
    classifier = new_model(cfg, 2, 0).to(device).eval()
    mae, diffusion = build_mae(cfg).to(device).eval(), build_diffusion(cfg).to(device).eval()
    x = torch.rand(n, 3, size, size, device=device)
    calib = torch.linspace(0, 1, 100)
    out: dict = {}
    with torch.no_grad():
        bare = _timed(lambda: (classifier(x), _sync(device)))
        out["bare_ms_per_scan"] = round(1e3 * bare / n, 3)
        for label, tau in (("clean_unflagged", float("inf")), ("flagged", float("-inf"))):
            defense = dataclasses.replace(cfg.defense, mode="selective", rule="threshold", t_min=60, t_max=120,
                                          votes=1)
            defended = DefendedClassifier(classifier, MAEDetector(mae), diffusion, defense, tau, calib)
            sec = _timed(lambda: (defended(x), _sync(device)))
            out[f"defended_{label}_ms_per_scan"] = round(1e3 * sec / n, 3)
            out[f"defended_{label}_over_bare"] = round(sec / bare, 2)
        purify = {}
        for sampler, steps in (("ddim", 1), ("ddim", 5), ("ddim", 20), ("ddpm", 1)):
            t = torch.full((n,), 60 if sampler == "ddpm" else 120, device=device)
            k = 4 if sampler == "ddpm" else n  # the full reverse process is slow: time fewer scans
            sec = _timed(lambda: (diffusion.purify(x[:k], t[:k], sampler, steps), _sync(device)), repeat=1)
            name = f"{sampler}_{steps}step" if sampler == "ddim" else "ddpm_full_reverse_from_t60"
            purify[name] = round(1e3 * sec / k, 2)
        out["purify_ms_per_scan"] = purify
    attack = make_pgd(classifier, cfg.attack, 0)
    y = torch.randint(0, 2, (n,), device=device)
    sec = _timed(lambda: (attack(x, y), _sync(device)), repeat=1)
    out["pgd_ms_per_scan"] = {"steps": cfg.attack.steps, "ms": round(1e3 * sec / n, 2)}
    return out


# defense settings compared under the same attacks (docs/results.md), as changes to the shipped one
CANDIDATES = {"selective mode": {"mode": "selective"}, "a vote of 3 purifications": {"votes": 3},
              "deeper: t* in [90, 180]": {"t_min": 90, "t_max": 180}}


def _defended_ms(classifier, mae, diffusion, defense, x, bare: float, device: str) -> dict:
    """A defense's time per clean (never flagged) and flagged scan, per stage, and its ratio to `bare`;
    where a clean scan stays unpurified, also without reusing the detector's logits (the gain)."""
    from medfedpure.defense.evaluation import build_detector

    out = {}
    calib = torch.linspace(0, 1, 100)
    for label, tau in (("clean", float("inf")), ("flagged", float("-inf"))):
        defended = DefendedClassifier(classifier, build_detector(defense.detector, mae, diffusion, classifier),
                                      diffusion, defense, tau, calib).eval()
        sec = _timed(lambda: (defended(x), _sync(device)))
        stages = defended.details(x).timings_ms
        out[label] = {"ms_per_scan": round(1e3 * sec / len(x), 2), "over_bare": round(sec / bare, 2),
                      "stages_ms": {k: round(v, 2) for k, v in stages.items()}}
        if label == "clean" and not defended.unflagged_stochastic and hasattr(defended.detector, "scores_and_logits"):
            defended.reuse_detector_logits = False
            sec = _timed(lambda: (defended(x), _sync(device)))
            out[label]["without_reusing_detector_logits_ms"] = round(1e3 * sec / len(x), 2)
    return out


def bench_shipped_default(cfg, device: str, n: int = 64, compile_too: bool = False) -> dict:
    """The defense as the preset ships it (its detector, mode, depths), per stage, for a clean
    (never flagged) and a flagged scan, against the bare classifier; then the same in channels-last
    layout (what `predict`/`serve` use); and the cost of one gradient through the whole defended
    classifier (what an adaptive attack pays per step per EOT draw); and the other defense
    settings compared against it (`candidates`, default layout)."""
    from medfedpure.defense.evaluation import build_detector
    from medfedpure.loop import channels_last

    size = cfg.data.image_size
    x = torch.rand(n, 3, size, size, device=device)
    y = torch.randint(0, 2, (n,), device=device)
    calib = torch.linspace(0, 1, 100)
    d = cfg.defense
    out: dict = {"detector": d.detector, "mode": d.mode, "t_min": d.t_min, "t_max": d.t_max,
                 "sampler": f"{d.sampler} x{d.sampler_steps}", "votes": d.votes, "batch": n}
    for layout in ("default", "channels_last") + (("channels_last_compiled",) if compile_too else ()):
        classifier = new_model(cfg, 2, 0).to(device).eval()
        diffusion = build_diffusion(cfg).to(device).eval()
        mae = build_mae(cfg).to(device).eval()
        row: dict = {}
        if layout.startswith("channels_last"):
            channels_last(classifier, diffusion)
        if layout.endswith("compiled"):  # torch.compile (inductor) of the classifier and the U-Net
            t0 = time.perf_counter()
            classifier, diffusion.model = torch.compile(classifier), torch.compile(diffusion.model)
            with torch.inference_mode():
                classifier(x), diffusion.model(x * 2 - 1, torch.full((n,), d.t_min, device=device))
            row["compile_s"] = round(time.perf_counter() - t0, 1)
        with torch.inference_mode():
            bare = _timed(lambda: (classifier(x), _sync(device)))
            row["bare_ms_per_scan"] = round(1e3 * bare / n, 2)
            row.update(_defended_ms(classifier, mae, diffusion, d, x, bare, device))
            if layout == "default":  # the settings issue 12 compared (their accuracies: docs/results.md)
                out["candidates"] = {name: _defended_ms(classifier, mae, diffusion, dataclasses.replace(d, **change),
                                                        x, bare, device)
                                     for name, change in CANDIDATES.items()}
        defended = DefendedClassifier(classifier, build_detector(d.detector, mae, diffusion, classifier),
                                      diffusion, d, 0.5, calib).eval()

        def gradient():
            xg = x[:32].clone().requires_grad_(True)
            torch.nn.functional.cross_entropy(defended(xg), y[:32]).backward()
            _sync(device)

        row["defended_gradient_ms_per_scan"] = round(1e3 * _timed(gradient, repeat=2) / 32, 2)
        out[layout] = row
    return out


def _stopwatch():
    """(add, totals): add(stage, seconds) sums a stage's time."""
    totals: dict[str, float] = {}

    def add(stage: str, seconds: float) -> None:
        totals[stage] = totals.get(stage, 0.0) + seconds
    return add, totals


def _hospital(cfg, br35h: str | None):
    """Hospital 0's loaders: its real split (Br35H where the scans are here, or the built-in synthetic
    scans), else random scans of the br35h-cpu hospital's sizes (speed does not depend on the pixels;
    the defended evaluation's flags do, a little)."""
    from torch.utils.data import DataLoader, TensorDataset

    real = cfg.data.dataset == "synthetic" or (cfg.data.dataset == "br35h" and br35h is not None)
    if real:
        if cfg.data.dataset == "br35h":
            cfg.data.root = br35h
        train, test, _ = task.client_loaders(cfg, 0, 1)
        return train, test, task.validation_loader(cfg, 0), f"{cfg.data.dataset}, hospital 0 ({cfg.data.root or 'built in'})"
    n_train, n_test, n_val, size = 168, 48, 24, cfg.data.image_size  # br35h-cpu's split of 2400 scans

    def scans(n: int, batch: int, shuffle: bool) -> DataLoader:
        ds = TensorDataset(torch.rand(n, 3, size, size), torch.randint(0, 2, (n,)))
        return DataLoader(ds, batch_size=batch, shuffle=shuffle, generator=torch.Generator().manual_seed(0))
    return (scans(n_train, cfg.train.batch_size, True), scans(n_test, 64, False), scans(n_val, 64, False),
            f"random scans ({n_train} train / {n_test} test / {n_val} validation, the br35h-cpu hospital's sizes)")


def _phase3_epoch(cfg, model, diffusion, loader, server_round: int = 1) -> dict[str, float]:
    """One local epoch of MedFedPure's phase 3 as `methods.medfedpure.train_local` runs it (its
    `defended_training_batch`), with a stopwatch per stage: crafting the adversarial share through
    the purifier, purifying, the experts' forward, backward and optimizer step; in channels-last
    layout where the preset trains that way (`train.channels_last`), the model left in the default one."""
    import copy

    from medfedpure.attacks import make_training_attack
    from medfedpure.defense.pipeline import RandomDepthPurified
    from medfedpure.loop import channels_last
    from medfedpure.methods.medfedpure import defended_training_batch

    if cfg.train.channels_last:
        diffusion = copy.deepcopy(diffusion)
        channels_last(model, diffusion)
    add, totals = _stopwatch()
    optimizer = moe_optimizer(model, cfg, cfg.train.lr)
    gen = torch.Generator().manual_seed(cfg.seed + server_round)
    attack = make_training_attack(RandomDepthPurified(model, diffusion, cfg.defense, gen),
                                  dataclasses.replace(cfg, method=cfg.defense.training_method(cfg.method)), 0)

    def timed_attack(x, y):
        t0 = time.perf_counter()
        try:
            return attack(x, y)
        finally:
            add("craft_adversarial_s", time.perf_counter() - t0)

    model.train()
    for x, y in loader:
        t0 = time.perf_counter()
        crafted = totals.get("craft_adversarial_s", 0.0)
        if cfg.defense.purify_training:
            x = defended_training_batch(x, y, diffusion, timed_attack, cfg.defense.adv_share, cfg, gen)
        add("purify_s", time.perf_counter() - t0 - (totals.get("craft_adversarial_s", 0.0) - crafted))
        t0 = time.perf_counter()
        loss, _ = model.loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        add("experts_step_s", time.perf_counter() - t0)
    model.to(memory_format=torch.contiguous_format)
    return totals


def bench_experiment_breakdown(cfg, br35h: str | None, flower: dict | None = None) -> dict:
    """Where the time of `medfedpure experiment --preset <preset> --methods medfedpure --no-suite
    --no-transfer` goes, by phase and stage: every stage timed once on one hospital (one local
    epoch of each phase, one per-round evaluation, one defended evaluation) and multiplied by how
    often the preset runs it (epochs x rounds x hospitals). A projection, not a run of the
    experiment: Flower's own overhead is added from the measured br35h-cpu round (`flower`) where
    given. Phase 3 is projected for the defense's adversarial training with PGD-k and with one N-FGSM
    step (`defense.adv_attack`; the preset ships N-FGSM), and for the PGD evaluation every round and in
    the final round only; phase 4 (`defense.purifier`, where the preset has rounds) from one local round
    of fine-tuning and one evaluation on the same hospital, against the N-FGSM epoch's classifier."""
    from medfedpure.defense.finetune import evaluate_purifier, finetune_purifier
    from medfedpure.defense.evaluation import evaluate_defense
    from medfedpure.defense.trainer import PHASES, eval_loss, train_epochs

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data), attack=dataclasses.replace(cfg.attack),
                              method=dataclasses.replace(cfg.method), defense=dataclasses.replace(cfg.defense))
    train, test, val, source = _hospital(cfg, br35h)
    clients, rounds = cfg.data.num_clients, cfg.train.rounds
    out: dict = {"scans": source, "hospitals": clients, "rounds": rounds}
    models = {}
    for name in ("diffusion", "mae"):  # phases 1-2: FedAvg of the whole model on clean scans
        phase, settings = PHASES[name], PHASES[name].settings(cfg)
        model = phase.build(cfg)
        loader = train if source.startswith("random") else \
            task.client_loaders(cfg, 0, 1, batch_size=settings.batch_size)[0]
        t0 = time.perf_counter()
        train_epochs(phase, model, loader, 1, settings.lr, cfg.device)
        epoch = time.perf_counter() - t0
        t0 = time.perf_counter()
        eval_loss(phase, model, test, cfg.device)
        ev = time.perf_counter() - t0
        models[name] = model.eval()
        n = settings.rounds * clients
        out[f"phase_{name}"] = {"local_epoch_s": round(epoch, 2), "evaluation_s": round(ev, 2),
                                "projected_s": round(n * (settings.local_epochs * epoch + ev), 1),
                                "runs": f"{settings.rounds} rounds x {clients} hospitals x {settings.local_epochs} epochs"}
    phase3: dict = {}
    shipped = cfg.defense.adv_attack
    out["shipped_attack"] = cfg.defense.training_method(cfg.method).adv_attack
    for label in ("pgd", "n-fgsm"):
        cfg.defense.adv_attack = label
        torch.manual_seed(0)
        model = new_model(cfg, 2, 0)
        stages = _phase3_epoch(cfg, model, models["diffusion"], train)
        phase3[f"local_epoch_{label}"] = {k: round(v, 2) for k, v in stages.items()}
    cfg.defense.adv_attack = shipped
    model.eval()
    t0 = time.perf_counter()
    task.test_local(model, test, cfg, 0, with_attack=False)
    clean_eval = time.perf_counter() - t0
    t0 = time.perf_counter()
    task.test_local(model, test, cfg, 0, with_attack=True)
    attacked_eval = time.perf_counter() - t0
    phase3["evaluation_clean_s"], phase3["evaluation_with_pgd_s"] = round(clean_eval, 2), round(attacked_eval, 2)
    d = cfg.defense
    t0 = time.perf_counter()
    evaluate_defense(model, models["mae"], models["diffusion"], val, test, make_pgd(model, cfg.attack, 0), d,
                     list(d.eval_detectors), list(d.eval_modes), 0)
    phase3["defended_evaluation_s"] = round(time.perf_counter() - t0, 2)
    phase3["defended_evaluation"] = f"{len(d.eval_detectors)} detectors x {len(d.eval_modes)} modes, paper protocol"
    p4 = cfg.defense.purifier
    if p4.rounds > 0:  # phase 4: the U-Net fine-tuned against the hospital's frozen classifier
        unet = build_diffusion(cfg)
        unet.load_state_dict(models["diffusion"].state_dict())
        t0 = time.perf_counter()
        finetune_purifier(unet.train(), model, train, cfg, seed=0)  # its local_epochs
        local = time.perf_counter() - t0
        t0 = time.perf_counter()
        evaluate_purifier(unet.eval(), model, test, cfg, seed=0)
        ev = time.perf_counter() - t0
        out["phase_purifier"] = {"local_round_s": round(local, 2), "evaluation_s": round(ev, 2),
                                 "projected_s": round(p4.rounds * clients * (local + ev), 1),
                                 "runs": f"{p4.rounds} rounds x {clients} hospitals x {p4.local_epochs} epochs",
                                 "attack": training_attack_label(dataclasses.replace(
                                     cfg, method=p4.training_method(cfg.defense.training_method(cfg.method))))}
    overhead = 0.0
    if flower and "flower_simulation_s" in flower:
        overhead = (flower["flower_simulation_s"] - flower["direct_s"]) / (clients * int(flower.get("rounds", 2)))
        phase3["flower_overhead_from"] = flower["work"]
        phase3["flower_overhead_s_per_hospital_round"] = round(overhead, 2)
    n = rounds * clients
    epochs = cfg.train.local_epochs
    projected = {}
    for label in ("pgd", "n-fgsm"):
        stages = phase3[f"local_epoch_{label}"]
        for every_round in (True, False):
            evals = n * clean_eval + (n if every_round else clients) * (attacked_eval - clean_eval)
            total = {**{k: round(n * epochs * v, 1) for k, v in stages.items()},
                     "per_round_evaluation_s": round(evals, 1),
                     "defended_evaluation_s": round(clients * phase3["defended_evaluation_s"], 1),
                     "flower_overhead_s": round(n * overhead, 1)}
            total["phase3_s"] = round(sum(total.values()), 1)
            total["experiment_s"] = round(total["phase3_s"] + sum(out[f"phase_{name}"]["projected_s"] for name in
                                                                  ("diffusion", "mae", "purifier") if f"phase_{name}" in out), 1)
            projected[f"adv_{label}, PGD evaluation {'every round' if every_round else 'final round only'}"] = total
    out["phase3"] = phase3
    out["projected"] = projected
    return out


def bench_defended_gradient(cfg, device: str, n: int = 32) -> dict:
    """One gradient through the shipped defended classifier, by stage, per scan (batch `n`): the
    detector's forward pass (no graph: it only decides flag and t*), purification forward and
    backward, the classifier forward and backward; the whole as `shipped_default` times it
    (`.backward()`, weight gradients included), as an attack takes it (the input's gradient
    alone), and per draw of one EOT-4 step (the detector shared by the draws), in channels-last
    layout also at the batch sizes the suite may attack with (attack.batch_size); default and
    channels-last layouts."""
    from medfedpure.attacks import PGD
    from medfedpure.defense.evaluation import build_detector
    from medfedpure.loop import channels_last

    size = cfg.data.image_size
    x = torch.rand(n, 3, size, size, device=device)
    y = torch.randint(0, 2, (n,), device=device)
    d = cfg.defense
    out: dict = {"batch": n, "detector": d.detector, "mode": d.mode}
    for layout in ("default", "channels_last"):
        classifier = new_model(cfg, 2, 0).to(device).eval()
        diffusion = build_diffusion(cfg).to(device).eval()
        if layout == "channels_last":
            channels_last(classifier, diffusion)
        detector = build_detector(d.detector, build_mae(cfg).to(device).eval(), diffusion, classifier)
        defended = DefendedClassifier(classifier, detector, diffusion, d, 0.5, torch.linspace(0, 1, 100)).eval()
        with torch.no_grad():
            _, _, t_star = defended.decide(x)

        def through(fn):
            xg = x.clone().requires_grad_(True)
            torch.autograd.grad(fn(xg).sum(), xg)
            _sync(device)

        def full_backward():
            xg = x.clone().requires_grad_(True)
            torch.nn.functional.cross_entropy(defended(xg), y).backward()
            _sync(device)

        def per_scan(fn, repeat=3):
            return round(1e3 * _timed(fn, repeat) / n, 2)

        with torch.no_grad():
            row = {"detector_forward_ms": per_scan(lambda: (detector(x), _sync(device))),
                   "purify_forward_ms": per_scan(lambda: (defended.purify(x, t_star), _sync(device))),
                   "classifier_forward_ms": per_scan(lambda: (classifier(x), _sync(device)))}
        row["purify_forward_backward_ms"] = per_scan(lambda: through(lambda v: defended.purify(v, t_star)))
        row["classifier_forward_backward_ms"] = per_scan(lambda: through(classifier))
        row["defended_gradient_ms_per_scan"] = per_scan(full_backward)
        row["attack_gradient_ms_per_scan"] = per_scan(
            lambda: through(lambda v: torch.nn.functional.cross_entropy(defended(v), y, reduction="none")))
        eot = PGD(defended, eps=cfg.attack.eps, alpha=cfg.attack.alpha, steps=1, eot=4)
        row["eot4_step_ms_per_scan_and_draw"] = round(per_scan(lambda: eot.value_and_gradient(x, y)) / 4, 2)
        if layout == "channels_last":  # the suite's batch (attack.batch_size): what one EOT-4 step costs per scan
            row["eot4_step_ms_per_scan_and_draw_by_batch"] = {
                str(b): round(1e3 * _timed(lambda b=b: eot.value_and_gradient(
                    torch.rand(b, 3, size, size, device=device), torch.randint(0, 2, (b,), device=device)),
                    repeat=3) / b / 4, 2) for b in (8, 16, 32, 64)}
        out[layout] = row
    return out


def bench_training_layout(cfg, br35h: str | None, repeats: int = 2) -> dict:
    """One local epoch of phase 3 (the preset's adversarial training through the purifier, N-FGSM) on
    hospital 0's split, in the default and in channels-last layout (`train.channels_last`), alternated
    `repeats` times so that drift on the machine falls on both."""
    from medfedpure.defense.trainer import PHASES

    train = _hospital(cfg, br35h)[0]
    diffusion = PHASES["diffusion"].build(cfg).eval()
    out: dict = {"work": "one phase-3 epoch, hospital 0, N-FGSM", "default_s": [], "channels_last_s": []}
    for _ in range(repeats):
        for layout in (False, True):
            run = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, channels_last=layout),
                                      defense=dataclasses.replace(cfg.defense, adv_attack="n-fgsm"))
            torch.manual_seed(0)
            stages = _phase3_epoch(run, new_model(run, 2, 0), diffusion, train)
            out["channels_last_s" if layout else "default_s"].append(round(sum(stages.values()), 2))
    out["ratio"] = round(sum(out["channels_last_s"]) / sum(out["default_s"]), 3)
    return out


def bench_flower_overhead(preset: str = "demo", data: str | None = None, rounds: int = 2) -> dict:
    """The same local work (every client's training and test, `rounds` rounds, no defense; the PGD
    test in the last round only, as the simulation runs it) as a Flower simulation and as plain calls
    in one process: the difference is Flower's (and Ray's start-up, about 15 s, spread over the rounds). `demo`: the tiny built-in
    run; `br35h-cpu` with `data`: a realistic round (10 hospitals, K=3 ResNet-18 at 64 px)."""
    from medfedpure.workflows.training import run_federated

    cfg = load_preset(preset)
    if data is not None:
        cfg.data.root = data
    cfg.defense.enabled, cfg.defense.purify_training, cfg.defense.adv_share = False, False, 0.0
    cfg.train.rounds = rounds
    if preset == "demo":
        cfg.data.num_clients = 2
    cfg.attack.eval_every_round = False

    def direct():
        experts = new_model(cfg, 2, cfg.seed).expert_state()
        for rnd in range(1, cfg.train.rounds + 1):
            for client in range(cfg.data.num_clients):
                model = new_model(cfg, 2, task.client_seed(cfg, client))
                model.load_experts(experts)
                train, test, _ = task.client_loaders(cfg, client, rnd)
                train_local(model, train, cfg, rnd)
                # as the simulation does: clean every round, PGD too in the last one (attack.eval_every_round off)
                task.test_local(model, test, cfg, 0, with_attack=rnd == cfg.train.rounds)

    task.data_and_splits(cfg)  # data made (or decoded and cached) once for both
    t0 = time.perf_counter()
    direct()
    plain = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_federated(cfg, tmp, progress=False)
        flower = time.perf_counter() - t0
    return {"work": f"{preset} preset, {cfg.data.num_clients} clients x {rounds} rounds, "
                    f"K={cfg.model.num_experts} x {cfg.model.backbone} @ {cfg.data.image_size}px, "
                    "no defense, PGD test in the last round",
            "clients": cfg.data.num_clients, "rounds": rounds,
            "direct_s": round(plain, 2), "flower_simulation_s": round(flower, 2), "ratio": round(flower / plain, 2)}


def bench_message_cost(cfg) -> dict:
    """What one Flower message with the preset's experts costs outside the training: their size, turning
    them into an ArrayRecord and back, pickling it (the simulation's Ray hop), and building the
    hospital's model that receives them (every message builds it anew)."""
    import pickle

    from flwr.app import ArrayRecord

    experts = new_model(cfg, 2, 0).expert_state()
    record = ArrayRecord(experts)
    blob = pickle.dumps(record)
    return {"experts_mb": round(sum(v.numel() * v.element_size() for v in experts.values()) / 1e6, 1),
            "to_array_record_s": round(_timed(lambda: ArrayRecord(experts)), 3),
            "to_torch_s": round(_timed(record.to_torch_state_dict), 3),
            "pickle_and_unpickle_s": round(_timed(lambda: pickle.loads(pickle.dumps(record))), 3),
            "pickled_mb": round(len(blob) / 1e6, 1),
            "build_model_s": round(_timed(lambda: new_model(cfg, 2, 1)), 3)}


def bench_deployment() -> dict:
    """The demo's phase 3 on Flower's deployment runtime (`deploy-local`: SuperLink + 3 SuperNodes on
    127.0.0.1, TLS, node authentication) against the simulation of the same config on the same
    per-hospital folders; and the tensor payload each hospital sends and receives per round."""
    from medfedpure.storage import read_json
    from medfedpure.workflows.deploy_local import deploy_local
    from medfedpure.workflows.training import run_federated

    cfg = load_preset("demo")
    cfg.defense.enabled = False
    cfg.train.rounds = 2
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = deploy_local(cfg, Path(tmp) / "deploy", progress=False)
        deployment = time.perf_counter() - t0
        run_cfg = ExperimentConfig.from_dict(read_json(Path(tmp) / "deploy" / "config.json"))
        t0 = time.perf_counter()
        sim = run_federated(run_cfg, Path(tmp) / "simulation", progress=False)
        simulation = time.perf_counter() - t0
        same = (Path(tmp) / "deploy" / "metrics.csv").read_text() == (sim.out_dir / "metrics.csv").read_text()
        history = read_json(Path(tmp) / "deploy" / "checkpoints" / "train.json")["state"]["history"]
    rounds = [{"round": int(r), "sent_bytes_per_hospital": rec["sent_bytes"],
               "received_bytes_per_hospital": {str(c): m["received_bytes"] for c, m in rec["clients"].items()}}
              for r, rec in sorted(history.items(), key=lambda kv: int(kv[0]))]
    return {"work": f"demo preset phase 3, {cfg.data.num_clients} hospitals x {cfg.train.rounds} rounds, no defense",
            "deployment_s": round(deployment, 1), "deployment_server_s": summary["final"]["wall_time_s"],
            "simulation_s": round(simulation, 1), "ratio": round(deployment / simulation, 2),
            "same_metrics_as_simulation": same, "bytes": "serialized tensors (experts only), before framing and TLS",
            "per_round": rounds}


SECTION_KEYS = ("training", "inference", "shipped_default", "defended_gradient", "message_cost", "flower_overhead",
                "flower_overhead_br35h_cpu", "deployment", "experiment_breakdown", "training_layout")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


SECTIONS = ("training", "inference", "shipped_default", "defended_gradient", "flower", "deployment", "breakdown",
            "training_layout")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="br35h-cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results.json")
    parser.add_argument("--only", default="",
                        help="comma-separated sections to run (" + ", ".join(SECTIONS) + "); the others keep "
                             "their figures from --out, each section saying when it was measured")
    parser.add_argument("--skip-flower", action="store_true", help="leave out the Flower overhead runs")
    parser.add_argument("--compile", action="store_true",
                        help="also time the shipped defense with torch.compile (about a minute of compiling)")
    parser.add_argument("--br35h", default="../shared/data/br35h",
                        help="Br35H folder (yes/ no/) for the realistic Flower-overhead round and the experiment "
                             "breakdown (random scans of the same sizes without it)")
    parser.add_argument("--skip-deployment", action="store_true",
                        help="leave out the deployment-runtime run (SuperLink + SuperNodes on 127.0.0.1)")
    parser.add_argument("overrides", nargs="*", help="section.field=value changes to --preset (a candidate)")
    args = parser.parse_args(argv)
    only = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = [t for t in only if t not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    run = set(only or SECTIONS) - ({"flower"} if args.skip_flower else set()) \
        - ({"deployment"} if args.skip_deployment else set())
    try:
        cfg = apply_overrides(load_preset(args.preset), args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    cfg.device = args.device
    torch.manual_seed(0)
    out_path = Path(args.out)
    result = read_json(out_path) if only and out_path.is_file() else {}
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    if result and (result.get("preset"), result.get("overrides", [])) != (args.preset, list(args.overrides)):
        parser.error(f"{out_path} holds figures of --preset {result.get('preset')} {result.get('overrides', [])}: "
                     "measure another configuration into another --out")
    result.update({"preset": args.preset, "overrides": list(args.overrides), "device": args.device,
                   "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "machine": platform.machine(), "python": sys.version.split()[0]})
    measured = result.setdefault("measured", {})
    for key in SECTION_KEYS:  # figures kept from a run that did not date its sections
        if key in result and key not in measured:
            measured[key] = "an earlier run (undated, perhaps another machine)"
    result["cpu"] = _cpu_name()
    br35h = args.br35h if Path(args.br35h).is_dir() else None

    def section(name: str, key: str, fn) -> None:
        if name in run:
            result[key] = fn()
            measured[key] = stamp

    section("training", "training", lambda: bench_training(cfg, args.device))
    section("inference", "inference", lambda: bench_inference(cfg, args.device))
    section("shipped_default", "shipped_default", lambda: bench_shipped_default(cfg, args.device,
                                                                                compile_too=args.compile))
    section("defended_gradient", "defended_gradient", lambda: bench_defended_gradient(cfg, args.device))
    section("flower", "message_cost", lambda: bench_message_cost(cfg))
    section("flower", "flower_overhead", bench_flower_overhead)
    if args.preset == "br35h-cpu" and br35h:
        section("flower", "flower_overhead_br35h_cpu", lambda: bench_flower_overhead("br35h-cpu", br35h))
    else:
        section("flower", "flower_overhead_br35h_cpu", lambda: {"skipped": f"no Br35H scans at {args.br35h} (--br35h DIR)"})
    section("deployment", "deployment", bench_deployment)
    section("breakdown", "experiment_breakdown",
            lambda: bench_experiment_breakdown(cfg, br35h, result.get("flower_overhead_br35h_cpu")))
    section("training_layout", "training_layout", lambda: bench_training_layout(cfg, br35h))
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    write_json(out_path, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
