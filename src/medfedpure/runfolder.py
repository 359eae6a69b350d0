"""A run folder: where each thing lives, round checkpoints and the config fingerprints behind resume.

```
<run>/config.json, partition.json, environment.json     what the run was asked for and got
<run>/diffusion.safetensors, mae.safetensors             phases 1-2 (the defense models)
<run>/global_experts.safetensors, summary.json, ...      phase 3 and its evaluation
<run>/purifier.safetensors                               phase 4 (defense.purifier.rounds > 0): the
                                                         fine-tuned U-Net the defense then uses
<run>/clients/client_NN/                                 what a hospital keeps (gate, calibration, history)
<run>/checkpoints/<phase>.safetensors + <phase>.json     the last finished round, for resume
<run>/baselines/<method>/                                another method trained on the same federation
<run>/earlier/<UTC time>/                                an evaluation's files (config, summary, defense)
                                                         as they were before an evaluation-only change
                                                         re-evaluated the run in place
```

After every round the server writes `checkpoints/<phase>.safetensors` (the global model) and
then `checkpoints/<phase>.json` (the round and the run's bookkeeping), both atomically. The
JSON names the round it belongs to and is written last, so it is the commit mark. Every
safetensors file that belongs to a round carries that round in its metadata (`saved_round`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from medfedpure.config import MEAN, ExperimentConfig
from medfedpure.storage import atomic_folder, load_tensors, read_json, save_tensors, tensor_metadata, write_json

# what every run folder holds: what it was asked for, its data split, where it ran, what it got
CONFIG, PARTITION, ENVIRONMENT, SUMMARY = "config.json", "partition.json", "environment.json", "summary.json"
# the defense models of phases 1-2, by phase
CHECKPOINTS = {"mae": "mae.safetensors", "diffusion": "diffusion.safetensors"}
PURIFIER = "purifier.safetensors"  # phase 4: the U-Net fine-tuned against the phase-3 classifiers
EXPERTS = "global_experts.safetensors"  # phase 3: the shared experts
GATE, CALIBRATION, HISTORY = "gate.safetensors", "detector_calibration.safetensors", "history.json"  # a hospital's
EARLIER, EVALUATIONS, BASELINES = "earlier", "evaluations", "baselines"
# what a re-evaluation rewrites
EVALUATION_FILES = (CONFIG, ENVIRONMENT, SUMMARY, "defense.json", "defense.csv")


def evaluation_files(run: Path | str) -> dict[str, bytes]:
    """The run's evaluation files as they are now (name -> bytes), to keep before a re-evaluation."""
    return {name: (Path(run) / name).read_bytes() for name in EVALUATION_FILES if (Path(run) / name).is_file()}


def keep_earlier(run: Path | str, files: dict[str, bytes]) -> Path:
    """Write an evaluation's files, as they were, into `<run>/earlier/<UTC time>/` (atomically), so a
    re-evaluation in place loses nothing already written."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = Path(run) / EARLIER / stamp, 1
    while target.exists():
        n += 1
        target = Path(run) / EARLIER / f"{stamp}-{n}"
    with atomic_folder(target) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return target


class ResumeError(ValueError):
    """A run folder whose saved state does not belong to the requested config."""


class RunFolderError(FileNotFoundError):
    """A run folder that lacks what an evaluation needs, or whose files do not match its config."""


def client_dir(run: Path | str, client: int) -> Path:
    """What hospital `client` keeps: its gate, detector calibration, history."""
    return Path(run) / "clients" / f"client_{client:02d}"


@dataclass(frozen=True)
class RunFolder:
    """One run folder, opened: its named paths (the layout above) and the loaders every command that
    reads a run goes through (evaluation, the transfer matrix, export). A missing file is one
    `RunFolderError` naming it."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of(cls, run: "Path | str | RunFolder") -> "RunFolder":
        return run if isinstance(run, RunFolder) else cls(run)

    def __truediv__(self, name: str) -> Path:  # a file this class does not name (e.g. an evaluation's)
        return self.path / name

    # --- paths
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def experts_file(self) -> Path:
        return self.path / EXPERTS

    @property
    def evaluations(self) -> Path:
        return self.path / EVALUATIONS

    def checkpoint(self, phase: str) -> Path:
        """Phase 1's or 2's weights (`diffusion`, `mae`)."""
        return self.path / CHECKPOINTS[phase]

    def client(self, client: int) -> Path:
        return client_dir(self.path, client)

    def baseline(self, method: str) -> "RunFolder":
        """Where another method trained on the same federation lives."""
        return RunFolder(self.path / BASELINES / method)

    def has_defense_models(self) -> bool:
        return all((self.path / f).is_file() for f in CHECKPOINTS.values())

    # --- loaders
    def config(self) -> ExperimentConfig:
        path = need(self.config_file, "config")
        return ExperimentConfig.from_dict(read_json(path), source=str(path))

    def classes(self) -> list[str]:
        return read_json(need(self.path / PARTITION, "partition record"))["classes"]

    def summary(self) -> dict:
        """summary.json, or {} before the run's first evaluation."""
        path = self.path / SUMMARY
        return read_json(path) if path.is_file() else {}

    def environment(self) -> dict:
        path = self.path / ENVIRONMENT
        return read_json(path) if path.is_file() else {}

    def experts(self) -> dict[str, torch.Tensor]:
        return load_tensors(need(self.experts_file, "global experts"))

    def weights(self, phase: str) -> dict[str, torch.Tensor]:
        """Phase 1's or 2's weights as tensors."""
        return load_tensors(need(self.checkpoint(phase), f"phase {phase}'s weights"))

    def gate(self, client: int) -> dict[str, torch.Tensor]:
        return load_tensors(need(self.client(client) / GATE, f"client {client}'s gate"))

    def calibration(self, client: int) -> dict[str, torch.Tensor]:
        return load_tensors(need(self.client(client) / CALIBRATION, f"client {client}'s calibration"))

    def purifier(self, cfg: ExperimentConfig) -> Path | None:
        """The U-Net file the defense purifies with (`purifier_weights`)."""
        return purifier_weights(self.path, cfg)


def need(path: Path, what: str) -> Path:
    """`path`, or one clear error naming what is missing."""
    if not path.is_file():
        raise RunFolderError(f"run folder is incomplete: {what} '{path}' is missing")
    return path


def purifier_weights(run: Path | str, cfg: ExperimentConfig) -> Path | None:
    """The U-Net file the defense purifies with: phase 4's where the config fine-tunes one
    (`defense.purifier.rounds` > 0), and only if it was made for this config (its fingerprint);
    else phase 1's. None where that file is missing or stale. The config decides, not the folder."""
    run = Path(run)
    if cfg.defense.purifier.rounds <= 0:
        path = run / CHECKPOINTS["diffusion"]
        return path if path.is_file() else None
    path = run / PURIFIER
    if not path.is_file() or tensor_metadata(path).get("fingerprint") != config_fingerprint(cfg, "purifier", True):
        return None
    return path


def saved_round(path: Path | str) -> int:
    """The round a safetensors file was saved at (-1 when it does not say)."""
    return int(tensor_metadata(path).get("round", -1))


# defense fields that only change the evaluation after training, not any phase's weights
EVALUATION_ONLY = ("detector", "mode", "rule", "kappa", "target_fpr", "eval_modes", "eval_detectors", "enabled",
                   "votes")
# attack fields that only the adaptive evaluation after training reads
ATTACK_EVALUATION_ONLY = ("adaptive_steps", "eot", "loss", "detector_weight", "square_queries", "draws", "suite",
                          "suite_max_per_client", "headline", "headline_max_per_client", "convergence",
                          "convergence_max_per_client", "batch_size", "channels_last")
# method fields that decide how adversarial training crafts its examples (MedFedPure's too)
ADVERSARIAL_TRAINING = ("adv_attack", "adv_noise", "adv_norm", "adv_eps", "adv_alpha", "adv_steps")


# fields added after run folders existed, and their defaults: left out of the fingerprint at the default
_ADDED_FIELDS = {("model", "small_input_stem"): False, ("model", "norm"): "batch", ("method", "adv_resources"): None,
                 ("defense", "adv_share"): 0.0, ("data", "layout"): "pooled", ("data", "classes"): None,
                 ("method", "adv_attack"): "pgd", ("method", "adv_noise"): None,
                 ("model", "width"): 64, ("defense", "adv_raw_share"): 0.0,
                 ("defense.purifier", "adv_attack"): None, ("defense.purifier", "adv_steps"): None,
                 ("data", "augmentation"): "mri", ("train", "nesterov"): False, ("train", "label_smoothing"): 0.0,
                 ("train", "schedule"): "step", ("train", "warmup"): 0.2,
                 ("method", "rounds"): {}}


def config_fingerprint(cfg: ExperimentConfig, phase: str, defended: bool) -> str:
    """The part of the config that decides a phase's weights (not the cache folder, not the CPUs).
    `defended`: whether the run's method trains with the defense (a baseline's defense section
    changes nothing, so it is left out; its method settings are in)."""
    raw = cfg.to_dict()
    raw["data"].pop("cache_dir", None)
    raw["train"].pop("channels_last", None)  # a layout, not the weights' recipe
    if raw["train"].get("schedule", "step") == "step":
        raw["train"].pop("warmup", None)  # only the linear schedule reads it
    if not raw["data"].get("augment", True):
        raw["data"].pop("augmentation", None)  # no augmentation: its kind is moot
    federation = raw.pop("federation", {})
    raw.pop("name", None)
    method = raw.pop("method", {})
    for name in ATTACK_EVALUATION_ONLY:
        raw["attack"].pop(name, None)
    for (section, field), default in _ADDED_FIELDS.items():  # runs made before them still match
        part_of = method if section == "method" else raw
        for key in () if section == "method" else section.split("."):
            part_of = part_of.get(key, {})
        if part_of.get(field, default) == default:
            part_of.pop(field, None)
    private = cfg.private_phases(defended)
    privacy = ({k: federation[k] for k in ("dp_noise_multiplier", "dp_epsilon", "dp_clipping_norm", "dp_delta")}
               | ({"dp_pretraining": private} if federation.get("dp_pretraining") else {}))  # one budget: all phases
    if phase in CHECKPOINTS:
        part = {"seed": raw["seed"], "data": raw["data"], "training": raw["defense"]["training"],
                phase: raw["defense"][phase]}
        if phase in private:  # released under differential privacy (federation.dp_pretraining)
            part["privacy"] = privacy
    else:
        part = raw
        if federation.get("aggregation", MEAN) != MEAN:  # a robust rule makes other experts
            part["aggregation"] = {k: federation[k] for k in ("aggregation", "trim_fraction")
                                   if k == "aggregation" or federation["aggregation"] == "trimmed-mean"}
        if private:  # and privacy
            part["privacy"] = privacy
        purifier = raw["defense"].get("purifier")
        part["defense"] = {k: v for k, v in raw["defense"].items()
                           if k not in EVALUATION_ONLY + ("mae", "training", "purifier")}
        # the defense's attacks: method.adv_* with defense.adv_attack where set (recorded as if method.adv_attack
        # had named it, so a run made that way before the field existed keeps its fingerprint)
        part["defense"].pop("adv_attack", None)
        trained = dataclasses.asdict(cfg.defense.training_method(cfg.method))
        chosen = {k: trained[k] for k in ADVERSARIAL_TRAINING
                  if trained[k] is not None and not (k == "adv_attack" and trained[k] == _ADDED_FIELDS["method", k])}
        if not defended:
            part.pop("defense")
            part["method"] = method
        elif max(raw["defense"].get("adv_share", 0.0), raw["defense"].get("adv_raw_share", 0.0)) > 0 and chosen:
            part["adversarial_training"] = chosen  # it trains on attacks made with them
        if phase == "purifier":  # phase 4 starts from phase 3's weights, with its own settings
            part["purifier"] = purifier
            if raw["defense"].get("adv_share", 0.0) <= 0:  # its attack follows them as well
                part["adversarial_training"] = chosen
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RoundState:
    round: int
    arrays: dict[str, torch.Tensor]
    state: dict


def _paths(out: Path, phase: str) -> tuple[Path, Path]:
    folder = Path(out) / "checkpoints"
    return folder / f"{phase}.safetensors", folder / f"{phase}.json"


def save_round(out: Path, phase: str, fingerprint: str, rnd: int, arrays: dict[str, torch.Tensor],
               state: dict) -> None:
    weights, meta = _paths(out, phase)
    save_tensors(weights, arrays, {"round": str(rnd)})
    write_json(meta, {"phase": phase, "round": rnd, "config": fingerprint, "state": state})


def load_round(out: Path, phase: str, fingerprint: str) -> RoundState | None:
    """The last finished round of `phase` in this folder, or None to start from round 1."""
    weights, meta = _paths(out, phase)
    if not meta.exists():
        return None
    try:
        info = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResumeError(f"round checkpoint '{meta}' is unreadable ({err}); delete it to start over") from err
    if not (isinstance(info, dict) and isinstance(info.get("round"), int) and isinstance(info.get("state"), dict)):
        raise ResumeError(f"round checkpoint '{meta}' is not one (a JSON object with 'round', 'config' and "
                          "'state'); delete the checkpoints/ folder to start over")
    if info.get("config") != fingerprint:
        raise ResumeError(f"'{meta.parent.parent}' holds a {phase} run made with another config; "
                          "use another --out, or delete its checkpoints/ folder to start over")
    arrays = load_tensors(weights)
    if saved_round(weights) != int(info["round"]):
        raise ResumeError(f"'{weights}' is from round {saved_round(weights)}, its record from round "
                          f"{info['round']}; delete the checkpoints/ folder to start over")
    return RoundState(int(info["round"]), arrays, info["state"])

