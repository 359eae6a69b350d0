"""`medfedpure experiment`: every phase each method needs, the internal-evasion matrix, the
attack suite on each method's own test splits, then the report. Finished phases (and rounds,
and evaluations) are not redone, so the same command resumes a killed experiment. MedFedPure
runs in `out`, a baseline in `out/baselines/<name>`."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from medfedpure.config import ExperimentConfig
from medfedpure.evaluation.transfer import transfer_done, transfer_matrix
from medfedpure.methods import METHODS, fingerprint
from medfedpure.runfolder import CHECKPOINTS, CONFIG, EVALUATION_ONLY, PURIFIER, SUMMARY, ResumeError, load_round
from medfedpure.storage import folder_kept_only_if_used, read_json, tensor_metadata, write_json
from medfedpure.evaluation.attack_suite import (OWN_TEST_EVALUATIONS, default_suite_dir, evaluate_suite, suite_done,
                                               suite_request, with_strongest)
from medfedpure.workflows.report import write_report
from medfedpure.workflows.training import run_federated, run_pretraining, run_purifier

log = logging.getLogger(__name__)

PHASE_ORDER = ("diffusion", "mae", "train", "purifier")


def phases_of(method, cfg: ExperimentConfig) -> tuple[str, ...]:
    """The phases a method trains under this config, in order (phase 4 only where it is asked for)."""
    if not (method.defended and cfg.defense.enabled):
        return ("train",)
    return PHASE_ORDER if cfg.defense.purifier.rounds > 0 else PHASE_ORDER[:-1]


def _weights_done(path: Path, expected: str) -> bool:
    if not path.is_file():
        return False
    try:
        return tensor_metadata(path).get("fingerprint") == expected
    except ValueError as err:
        raise ResumeError(f"{err}; delete it to train that phase again") from err


def phase_done(cfg: ExperimentConfig, out: Path, phase: str) -> bool:
    """Whether `out` already holds this phase's final result for this config (phase 3 and 4: with the
    defended evaluation made with the U-Net the config asks for)."""
    if phase in CHECKPOINTS:
        return _weights_done(out / CHECKPOINTS[phase], fingerprint(cfg, phase))
    path = out / SUMMARY
    if not path.is_file():
        return False
    summary = read_json(path)
    if not isinstance(summary, dict):
        raise ResumeError(f"'{path}' is not a run summary (a JSON object); delete it and rerun to evaluate again")
    if summary.get("fingerprint") != fingerprint(cfg, "train"):
        return False
    if phase == "purifier":  # the defended evaluation made with phase 4's U-Net, which is this config's
        tag = fingerprint(cfg, "purifier")
        return "defense" in summary and summary.get("purifier") == tag and _weights_done(out / PURIFIER, tag)
    if not cfg.defense.enabled or cfg.defense.purifier.rounds > 0:  # phase 4's step evaluates the defense
        return True
    return "defense" in summary and summary.get("purifier") is None  # made with phase 1's U-Net


def run_phase(cfg: ExperimentConfig, phase: str, out: Path, **options):
    """Train one phase into `out`; phase 4 fine-tunes the U-Net (unless done) and then runs phase 3's
    defended evaluation again with it (phase 3's rounds are done, so only the evaluation runs)."""
    if phase == "train":
        return run_federated(cfg, out, **options)
    if phase != "purifier":
        return run_pretraining(cfg, phase, out, **options)
    if not _weights_done(out / PURIFIER, fingerprint(cfg, "purifier")):
        run_purifier(cfg, out, **options)
    done = load_round(out, "train", fingerprint(cfg, "train"))
    if done is None or done.round < cfg.train.rounds:  # the evaluation must not retrain phase 3
        raise ResumeError(f"'{out}' lacks phase 3's last round checkpoint (checkpoints/train.*), which the defended "
                          "evaluation after phase 4 resumes from; train phase 3 again into another --out")
    return run_federated(cfg, out, **options)


def evaluation_overrides(cfg: ExperimentConfig, trained: ExperimentConfig) -> list[str]:
    """`attack.*` and evaluation-only `defense.*` fields where this command's config differs from the
    one the run was trained with (they change no weights, so training is not redone, but the
    evaluations must follow them)."""
    own = {name for pair in OWN_TEST_EVALUATIONS.values() for name in pair}  # each evaluation passes its own
    fields = [("attack", f.name) for f in dataclasses.fields(cfg.attack) if f.name not in own]
    fields += [("defense", name) for name in EVALUATION_ONLY if name != "enabled"]
    return [f"{section}.{name}={json.dumps(getattr(getattr(cfg, section), name))}" for section, name in fields
            if getattr(getattr(cfg, section), name) != getattr(getattr(trained, section), name)]


class _Timings:
    """Seconds per step of the experiment, kept in `timings.json` across reruns."""

    def __init__(self, out: Path) -> None:
        self.path = out / "timings.json"
        self.data = read_json(self.path) if self.path.is_file() else {}

    def run(self, key: str, fn, *args, **kwargs):
        t0 = time.time()
        result = fn(*args, **kwargs)
        self.data[key] = round(time.time() - t0, 1)
        write_json(self.path, self.data)
        return result


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, progress: bool = True,
                   flower_log_level: int = logging.ERROR, methods: list[str] | None = None,
                   transfer: bool = True, suite: bool = True) -> dict:
    out = Path(out_dir).resolve()
    with folder_kept_only_if_used(out):
        return _run_experiment(cfg, out, progress, flower_log_level, methods, transfer, suite)


def _run_experiment(cfg: ExperimentConfig, out: Path, progress: bool, flower_log_level: int,
                    methods: list[str] | None, transfer: bool, suite: bool) -> dict:
    timings = _Timings(out)
    options = {"progress": progress, "flower_log_level": flower_log_level}
    for name in methods or [cfg.method.name]:
        method = METHODS[name]
        mcfg = method.configure(cfg)
        folder = method.folder(out)
        for phase in phases_of(method, mcfg):
            if phase_done(mcfg, folder, phase):
                log.info("%s phase %s: already done in %s, not redone", name, phase, folder)
            else:
                key = f"train:{name}" if phase == "train" and not method.defended else phase
                timings.run(key, run_phase, mcfg, phase, folder, **options)
        if transfer and mcfg.data.num_clients > 1 and not transfer_done(folder, mcfg):  # one client: no one to send to
            timings.run(f"transfer:{name}", transfer_matrix, folder, progress=progress)
        if suite:
            for kind in OWN_TEST_EVALUATIONS:
                _suite(mcfg, folder, kind, timings, f"{kind}:{name}", progress)
    return write_report(out)


def _suite(cfg: ExperimentConfig, folder: Path, kind: str, timings: _Timings, key: str, progress: bool) -> None:
    """One own-test evaluation (`kind`: the suite, the headline on more scans with the suite's strongest
    attack added, the convergence check) on the method's own test splits, unless it has no attacks or is
    already done as asked."""
    attacks_field, cap_field = OWN_TEST_EVALUATIONS[kind]
    attacks, cap = getattr(cfg.attack, attacks_field), getattr(cfg.attack, cap_field)
    if not attacks:
        return
    if kind == "headline":
        attacks = with_strongest(attacks, default_suite_dir(folder, "suite"))
    changed = evaluation_overrides(cfg, ExperimentConfig.from_dict(read_json(folder / CONFIG)))
    request = suite_request(folder, None, attacks, overrides=changed, max_per_client=cap)
    if not suite_done(default_suite_dir(folder, kind), request):
        timings.run(key, evaluate_suite, folder, None, attacks, overrides=changed, max_per_client=cap,
                    out=default_suite_dir(folder, kind), progress=progress)
