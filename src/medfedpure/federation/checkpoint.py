"""Round checkpoints, so a killed run resumes where it stopped (finished rounds are not redone).

After every round the server writes `checkpoints/<phase>.safetensors` (the global model)
and then `checkpoints/<phase>.json` (the round and the run's bookkeeping), both atomically.
The JSON names the round it belongs to and is written last, so it is the commit mark.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from medfedpure.config import ExperimentConfig
from medfedpure.storage import load_tensors, save_tensors, write_json


class ResumeError(ValueError):
    """A run folder whose saved state does not belong to the requested config."""


# defense fields that only change the evaluation after training, not any phase's weights
EVALUATION_ONLY = ("detector", "mode", "rule", "kappa", "target_fpr", "eval_modes", "eval_detectors", "enabled",
                    "votes")
# attack fields that only the adaptive evaluation after training reads
ATTACK_EVALUATION_ONLY = ("adaptive_steps", "eot", "loss", "detector_weight", "square_queries", "draws", "suite",
                           "suite_max_per_client", "batch_size")


# fields added after run folders existed, and their defaults: left out of the fingerprint at the default
_ADDED_FIELDS = {("model", "small_input_stem"): False, ("model", "norm"): "batch", ("method", "adv_resources"): None,
                 ("defense", "adv_share"): 0.0}


def config_fingerprint(cfg: ExperimentConfig, phase: str) -> str:
    """The part of the config that decides a phase's weights (not the cache folder, not the CPUs)."""
    raw = cfg.to_dict()
    raw["data"].pop("cache_dir", None)
    raw.pop("federation", None)
    raw.pop("name", None)
    method = raw.pop("method", {})
    for name in ATTACK_EVALUATION_ONLY:
        raw["attack"].pop(name, None)
    for (section, field), default in _ADDED_FIELDS.items():  # runs made before them still match
        part_of = method if section == "method" else raw[section]
        if part_of.get(field, default) == default:
            part_of.pop(field, None)
    if phase in ("mae", "diffusion"):
        part = {"seed": raw["seed"], "data": raw["data"], "training": raw["defense"]["training"],
                phase: raw["defense"][phase]}
    else:
        part = raw
        part["defense"] = {k: v for k, v in raw["defense"].items()
                           if k not in EVALUATION_ONLY + ("mae", "training")}
        if method.get("name", "medfedpure") != "medfedpure":  # a baseline: no defense, its own settings
            part.pop("defense")
            part["method"] = method
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RoundState:
    round: int
    arrays: dict[str, torch.Tensor]
    state: dict


def _paths(out: Path, phase: str) -> tuple[Path, Path]:
    folder = Path(out) / "checkpoints"
    return folder / f"{phase}.safetensors", folder / f"{phase}.json"


def save_round(out: Path, phase: str, cfg: ExperimentConfig, rnd: int, arrays: dict[str, torch.Tensor],
               state: dict) -> None:
    weights, meta = _paths(out, phase)
    save_tensors(weights, arrays, {"round": str(rnd)})
    write_json(meta, {"phase": phase, "round": rnd, "config": config_fingerprint(cfg, phase),
                      "state": state})


def load_round(out: Path, phase: str, cfg: ExperimentConfig) -> RoundState | None:
    """The last finished round of `phase` in this folder, or None to start from round 1."""
    weights, meta = _paths(out, phase)
    if not meta.exists():
        return None
    try:
        info = json.loads(meta.read_text())
    except json.JSONDecodeError as err:
        raise ResumeError(f"round checkpoint '{meta}' is unreadable ({err}); delete it to start over") from err
    if info.get("config") != config_fingerprint(cfg, phase):
        raise ResumeError(f"'{meta.parent.parent}' holds a {phase} run made with another config; "
                          "use another --out, or delete its checkpoints/ folder to start over")
    arrays = load_tensors(weights)
    from safetensors import safe_open
    with safe_open(str(weights), "pt") as fh:
        saved_round = int((fh.metadata() or {}).get("round", -1))
    if saved_round != int(info["round"]):
        raise ResumeError(f"'{weights}' is from round {saved_round}, its record from round {info['round']}; "
                          "delete the checkpoints/ folder to start over")
    return RoundState(int(info["round"]), arrays, info["state"])


def clear_rounds(out: Path, phase: str) -> None:
    for path in _paths(out, phase):
        path.unlink(missing_ok=True)
