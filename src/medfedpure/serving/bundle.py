"""One hospital's defended classifier as a self-contained folder (`medfedpure export`).

    model-dir/model.safetensors   classifier.* (global experts + this hospital's gate), mae.*,
                                  diffusion.*, calibration.scores (its clean detector scores)
    model-dir/manifest.json       format and version, classes, image size and preprocessing,
                                  the detector, tau and the defense settings, the run's config,
                                  commit and metrics, and every tensor's shape

The manifest's `digest` is the SHA-256 of the weights file and of the manifest itself (without
the digest): `load_bundle` recomputes it, so a bundle edited after export (classes reversed, tau or
the image size changed, another run's weights of the same shapes) is refused, and its first 16 hex
digits are the model's id, which `/info` and every answer carry. Signed at export with the
hospital's Ed25519 key (`export --sign-key`), `signature.ed25519` proves who exported it:
`predict`/`serve --trust KEY.pub` refuse a bundle whose signature is missing or does not verify.
It also checks the manifest's fields and types, every tensor's shape and that every weight is
finite before it builds anything, and fails with one line naming the file on any mismatch.
"""

from __future__ import annotations

import hashlib
import logging
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medfedpure.config import ExperimentConfig
from medfedpure.defense import DefendedClassifier
from medfedpure.defense.detectors import build_detector
from medfedpure.defense.trainer import build_pretrained
from medfedpure.evaluation.runs import defended_classifier, load_client_model
from medfedpure.methods import new_model, task
from medfedpure.reporting.rows import Headline
from medfedpure.runfolder import RunFolder, RunFolderError
from medfedpure.storage import atomic_folder, load_tensors, read_json, save_tensors, write_json

log = logging.getLogger(__name__)

FORMAT, VERSION = "medfedpure-model", 2  # 2: the digest
WEIGHTS, MANIFEST, SIGNATURE = "model.safetensors", "manifest.json", "signature.ed25519"
PREPROCESSING = ("RGB, bilinear resize to image_size x image_size, [0, 1] floats; DICOM: rescale slope/intercept, "
                 "window center/width (else min-max), MONOCHROME1 inverted; NIfTI: one axial slice, min-max")


class BundleError(ValueError):
    """A model folder that cannot be used; the message names the file."""


@dataclass
class Bundle:
    folder: Path
    manifest: dict
    cfg: ExperimentConfig
    classes: list[str]
    defended: DefendedClassifier
    mae: nn.Module
    seed: int

    @property
    def model_id(self) -> str:
        """The first 16 hex digits of the bundle's digest (weights and manifest): which model answered."""
        return self.manifest["digest"][:16]


# what a manifest must hold, and of which JSON type (export writes more: preprocessing, run, ...)
_FIELDS = {"format": str, "version": int, "client": int, "classes": list, "image_size": int, "seed": int,
           "config": dict, "tensors": dict, "digest": str, "detector": str, "mode": str, "rule": str,
           "tau": (int, float, type(None)), "threshold": (int, float, type(None)), "target_fpr": (int, float),
           "t_min": int, "t_max": int, "sampler": str, "sampler_steps": int, "votes": int}


def bundle_digest(weights: bytes, manifest: dict) -> str:
    """SHA-256 of the weights file's bytes and of the manifest's canonical JSON (without its digest)."""
    body = json.dumps({k: v for k, v in manifest.items() if k != "digest"}, sort_keys=True).encode()
    return hashlib.sha256(hashlib.sha256(weights).digest() + body).hexdigest()


def _private_key(path: Path | str):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise BundleError(f"--sign-key '{path}' is not a readable PEM private key ({err})") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"--sign-key '{path}' is not an Ed25519 key (openssl genpkey -algorithm ed25519)")
    return key


def verify_signature(folder: Path, digest: str, trust: Path | str) -> None:
    """The bundle's signature of its digest, checked against the trusted public key, or one error."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(Path(trust).read_bytes())
    except (OSError, ValueError) as err:
        raise BundleError(f"--trust '{trust}' is not a readable PEM public key ({err})") from err
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"--trust '{trust}' is not an Ed25519 public key")
    path = folder / SIGNATURE
    if not path.is_file():
        raise BundleError(f"'{folder}' is not signed ({SIGNATURE} is missing) and --trust asks for a signed model")
    try:
        key.verify(bytes.fromhex(path.read_text().strip()), digest.encode())
    except (InvalidSignature, ValueError) as err:
        raise BundleError(f"'{path}' does not verify with '{trust}': not the model that key's holder exported") from err


def export_bundle(run: Path | str, client: int, out: Path | str, sign_key: Path | str | None = None) -> Path:
    """Write client `client`'s defended classifier from a trained run into a new folder `out`,
    signed with the Ed25519 private key `sign_key` (PEM) where given."""
    run, out = Path(run), Path(out)
    key = _private_key(sign_key) if sign_key is not None else None  # refused before anything is written
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"'{out}' already exists and is not empty; choose a new folder")
    folder = RunFolder(run)
    cfg = folder.config()
    if not 0 <= client < cfg.data.num_clients:
        raise BundleError(f"--client must be 0-{cfg.data.num_clients - 1} (the run has {cfg.data.num_clients} clients)")
    classes = folder.classes()
    model = load_client_model(folder, cfg, client, len(classes))
    mae = build_pretrained("mae", cfg, folder.weights("mae"), "the run's MAE")
    purifier = folder.purifier(cfg)  # phase 4's where the run fine-tuned one for its config
    if purifier is None:
        which = ("phase 4's (purifier.safetensors)" if cfg.defense.purifier.rounds
                 else "phase 1's (diffusion.safetensors)")
        raise RunFolderError(f"run folder '{run}' is incomplete: its U-Net, {which}, is missing or was made for "
                             "another config")
    diffusion = build_pretrained("diffusion", cfg, load_tensors(purifier), f"the run's U-Net ({purifier.name})")
    defended = defended_classifier(folder, cfg, client, model, mae, diffusion)
    tensors = {**_prefixed("classifier", model), **_prefixed("mae", mae), **_prefixed("diffusion", diffusion),
               "calibration.scores": defended.calibration_scores.clone()}
    d = cfg.defense
    domain = _hospital_domain(cfg, client)
    env, summary = folder.environment(), folder.summary()
    manifest = {"format": FORMAT, "version": VERSION, "client": client, "classes": classes,
                "image_size": cfg.data.image_size, "preprocessing": PREPROCESSING,
                "detector": d.detector, "tau": defended.tau, "threshold": defended.threshold(),
                "target_fpr": d.target_fpr, "mode": d.mode, "rule": d.rule, "t_min": d.t_min, "t_max": d.t_max,
                "sampler": d.sampler, "sampler_steps": d.sampler_steps, "votes": d.votes,
                "seed": task.client_seed(cfg, client, purpose="defense"), "config": cfg.to_dict(),
                "run": {"folder": str(run.resolve()), "commit": env.get("git_commit"),
                        "metrics": {"final": summary.get("final"), "defense": summary.get("defense")},
                        "adaptive_headline": _adaptive_headline(run)},
                **_monai_metadata(cfg, classes), "domain": domain,
                "tensors": {k: list(v.shape) for k, v in tensors.items()}}
    with atomic_folder(out) as tmp:
        save_tensors(tmp / WEIGHTS, tensors, {"format": FORMAT, "version": str(VERSION)})
        manifest["digest"] = bundle_digest((tmp / WEIGHTS).read_bytes(), manifest)
        write_json(tmp / MANIFEST, manifest)
        if key is not None:
            (tmp / SIGNATURE).write_text(key.sign(manifest["digest"].encode()).hex() + "\n")
    return out


INTENDED_USE = ("Research only, not a medical device: a brain-MRI tumor classifier trained by federated learning, "
                "behind an adversarial-scan detector and a diffusion purifier, for the hospital it was exported for. "
                "Not validated for clinical decisions.")


def _monai_metadata(cfg: ExperimentConfig, classes: list[str]) -> dict:
    """What a MONAI bundle's metadata.json says of a model: its input and output format, and its use."""
    size = cfg.data.image_size
    return {"intended_use": INTENDED_USE, "task": "classification", "network_data_format": {
        "inputs": {"image": {"type": "image", "format": "RGB (a grayscale scan in all three channels)",
                             "modality": "MRI", "num_channels": 3, "spatial_shape": [size, size], "dtype": "float32",
                             "value_range": [0, 1], "is_patch_data": False,
                             "channel_def": {"0": "R", "1": "G", "2": "B"}}},
        "outputs": {"pred": {"type": "probabilities", "format": "classes", "num_channels": len(classes),
                             "dtype": "float32", "value_range": [0, 1], "is_onehot": False,
                             "channel_def": {str(i): c for i, c in enumerate(classes)}}}}}


def _hospital_domain(cfg: ExperimentConfig, client: int) -> dict | None:
    """The statistics of the hospital's own scans, its training and validation splits as they are
    (no augmentation; what `predict` checks a scan against), or None where they are not on this machine."""
    import numpy as np

    from medfedpure.data import DataError, make_loader
    from medfedpure.data.scans import domain_of

    try:
        data, split = task.hospital(cfg, client)
        idx = np.concatenate([split.train_idx, split.val_idx])
        own = make_loader(data, idx, 64, train=False)
        scans = torch.cat([b[0] for b in own])
        if data.paths:
            geometries = _geometries([data.paths[i] for i in idx])
        elif cfg.data.dataset == "synthetic":  # made at the model's input size, three channels
            geometries = [{"width": cfg.data.image_size, "height": cfg.data.image_size, "channels": 3}]
        else:
            geometries = None
    except (DataError, ValueError, OSError) as err:
        log.warning("no out-of-domain check in the bundle: the hospital's scans are not readable (%s)",
                    str(err).splitlines()[0] if str(err) else err)
        return None
    return domain_of((scans * 255).round().clamp(0, 255).byte().numpy(), geometries)


def _geometries(paths: list[str]) -> list[dict] | None:
    """The hospital's files' own sizes and channels, from their headers (None where no header reads:
    then the out-of-domain check has no size or channel part; built-in synthetic data has no files)."""
    from PIL import UnidentifiedImageError

    from medfedpure.data.scans import image_geometry

    found = []
    for p in paths:
        try:
            found.append(image_geometry(p))
        except (OSError, UnidentifiedImageError, ValueError):
            continue
    return found if len(found) == len(paths) else None


def _adaptive_headline(run: Path) -> dict | None:
    """The run's strongest-attack figure (its own-test suite's headline), with its interval and attack."""
    from medfedpure.evaluation.attack_suite import default_suite_dir

    path = default_suite_dir(run) / "evaluation.json"
    if not path.is_file():
        return None
    h = Headline.from_dict(read_json(path)["headline"])
    return {"attack": h.attack, "first": h.first, "first_ci": h.first_ci, "n": h.n}


def _prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()}


def _part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def load_bundle(folder: Path | str, trust: Path | str | None = None) -> Bundle:
    """A model folder written by `export_bundle`, ready to classify; with `trust` (an Ed25519 public
    key, PEM), only if its signature verifies with it."""
    folder = Path(folder)
    manifest_path, weights_path = folder / MANIFEST, folder / WEIGHTS
    for path in (manifest_path, weights_path):
        if not path.is_file():
            raise BundleError(f"'{path}' is missing: is '{folder}' a folder written by `medfedpure export`?")
    try:
        manifest = read_json(manifest_path)
    except (RunFolderError, ValueError) as err:
        raise BundleError(f"'{manifest_path}' cannot be read: {err}") from err
    if not isinstance(manifest, dict):
        raise BundleError(f"'{manifest_path}' is not a manifest (a JSON object)")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise BundleError(f"'{manifest_path}' is {manifest.get('format')} version {manifest.get('version')}; "
                          f"this medfedpure reads {FORMAT} version {VERSION} (export the model again)")
    bad = [k for k, kind in _FIELDS.items() if k not in manifest or not isinstance(manifest[k], kind)
           or (kind is int and isinstance(manifest[k], bool))]
    if bad:
        raise BundleError(f"'{manifest_path}': field(s) {', '.join(bad)} missing or of the wrong type")
    if bundle_digest(weights_path.read_bytes(), manifest) != manifest["digest"]:
        raise BundleError(f"'{folder}': {WEIGHTS} or {MANIFEST} changed after export (their digest does not "
                          "match): export the model again, and never edit a bundle by hand")
    if trust is not None:
        verify_signature(folder, manifest["digest"], trust)
    tensors = load_tensors(weights_path)
    expected = manifest.get("tensors", {})
    wrong = sorted(k for k in set(expected) | set(tensors)
                   if k not in tensors or k not in expected or list(tensors[k].shape) != expected[k])
    if wrong:
        raise BundleError(f"'{weights_path}' does not match its manifest: {len(wrong)} tensor(s) missing or of "
                          f"another shape, first {wrong[0]}")
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise BundleError(f"'{weights_path}': {len(broken)} tensor(s) hold NaN or infinite values, first {broken[0]}")
    cfg = ExperimentConfig.from_dict(manifest["config"], source=str(manifest_path))
    try:
        defended, mae = _build(cfg, manifest, tensors)
    except (RuntimeError, ValueError) as err:
        raise BundleError(f"'{weights_path}' does not fit the model its manifest describes: "
                          f"{str(err).splitlines()[0][:300]}") from err
    return Bundle(folder, manifest, cfg, list(manifest["classes"]), defended, mae, int(manifest["seed"]))


def _build(cfg: ExperimentConfig, manifest: dict, tensors: dict) -> tuple[DefendedClassifier, nn.Module]:
    model = new_model(cfg, len(manifest["classes"]), init_seed=0)
    model.load_state_dict(_part(tensors, "classifier"))
    model.eval()
    mae = build_pretrained("mae", cfg, _part(tensors, "mae"), "the bundle's MAE")
    diffusion = build_pretrained("diffusion", cfg, _part(tensors, "diffusion"), "the bundle's U-Net")
    seed = int(manifest["seed"])
    detector = build_detector(cfg.defense.detector, mae, diffusion, model, seed)
    defended = DefendedClassifier(model, detector, diffusion, cfg.defense, manifest["tau"],
                                  tensors["calibration.scores"]).eval()
    defended.generator = torch.Generator().manual_seed(seed)
    return defended, mae


__all__ = ["Bundle", "BundleError", "export_bundle", "load_bundle"]
