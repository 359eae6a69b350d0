"""MedFedPure benchmarks: one command, one JSON.

    python benchmarks/run.py [--preset br35h-cpu] [--device cpu|cuda] [--out benchmarks/results.json] [--compile]

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

from medfedpure.attacks import make_pgd
from medfedpure.config import ExperimentConfig, load_preset
from medfedpure.defense import DefendedClassifier, MAEDetector, build_diffusion, build_mae
from medfedpure.methods import new_model, task
from medfedpure.methods.medfedpure import moe_optimizer, train_local
from medfedpure.storage import write_json


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


def bench_flower_overhead(preset: str = "demo", data: str | None = None, rounds: int = 2) -> dict:
    """The same local work (every client's training and clean test, `rounds` rounds, no defense and
    no attack) as a Flower simulation and as plain calls in one process. `demo`: the tiny built-in
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
                task.test_local(model, test, cfg, 0, with_attack=False)

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
                    "no defense, no attack",
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="br35h-cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results.json")
    parser.add_argument("--skip-flower", action="store_true", help="leave out the Flower overhead runs")
    parser.add_argument("--compile", action="store_true",
                        help="also time the shipped defense with torch.compile (about a minute of compiling)")
    parser.add_argument("--br35h", default="../shared/data/br35h",
                        help="Br35H folder (yes/ no/) for the realistic Flower-overhead round (skipped if absent)")
    parser.add_argument("--skip-deployment", action="store_true",
                        help="leave out the deployment-runtime run (SuperLink + SuperNodes on 127.0.0.1)")
    args = parser.parse_args(argv)
    cfg = load_preset(args.preset)
    cfg.device = args.device
    torch.manual_seed(0)
    result = {"preset": args.preset, "device": args.device, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(), "python": sys.version.split()[0],
              "training": bench_training(cfg, args.device), "inference": bench_inference(cfg, args.device),
              "shipped_default": bench_shipped_default(cfg, args.device, compile_too=args.compile)}
    if not args.skip_flower:
        result["message_cost"] = bench_message_cost(cfg)
        result["flower_overhead"] = bench_flower_overhead()
        if args.preset == "br35h-cpu" and Path(args.br35h).is_dir():
            result["flower_overhead_br35h_cpu"] = bench_flower_overhead("br35h-cpu", args.br35h)
        else:
            result["flower_overhead_br35h_cpu"] = {"skipped": f"no Br35H scans at {args.br35h} (--br35h DIR)"}
    if not args.skip_deployment:
        result["deployment"] = bench_deployment()
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    write_json(Path(args.out), result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
