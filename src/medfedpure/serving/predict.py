"""One hospital's defended classifier answering for single scans (`medfedpure predict`, `serve`).

Per scan: the label and its probability, the detector's score and its percentile among the
hospital's clean calibration scans, whether it was flagged, the purification depth t*, and,
on request, the purified scan and the MAE's error map as images.

One answer per scan: the purification noise is drawn from a seed keyed on the scan's pixels
(HMAC-SHA256 with the predictor's noise key), so the same scan sent again gets the same answer,
and resubmitting it unchanged gains an attacker nothing (a copy changed in one pixel meets fresh
noise: near-copies still give an attacker several draws, the evaluation's worst of N). `predict` derives the key from the bundle's seed
(`--seed` to change it: reproducible runs); `serve` draws a secret key when it starts (or reads
`--noise-key-file`), so no one outside the service can compute the noise a scan will meet.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medfedpure.data.scans import out_of_domain, read_scan
from medfedpure.loop import channels_last
from medfedpure.serving.bundle import Bundle, load_bundle


@dataclass
class Answer:
    report: dict  # what `predict --json` prints and `POST /predict` returns
    scan: np.ndarray  # uint8 (S, S, 3): the scan as the model saw it
    purified: np.ndarray  # uint8 (S, S, 3)
    error_map: np.ndarray | None  # float (S, S): the MAE's per-patch error, upsampled (when views were asked)


class Predictor:
    """Loads a bundle once; `predict` is safe to call from several threads (one scan at a time)."""

    def __init__(self, model_dir: Path | str, seed: int | None = None, fast_layout: bool = True,
                 noise_key: bytes | None = None, stability_draws: int = 4, trust: Path | str | None = None) -> None:
        """`stability_draws`: further purifications of each scan (their own keyed noise) that say how
        stable the answer is; the answer itself is the one draw the attack suite evaluates."""
        if stability_draws < 0:
            raise ValueError("stability_draws must be >= 0")
        self.stability_draws = stability_draws
        self.bundle: Bundle = load_bundle(model_dir, trust)
        self.image_size = int(self.bundle.manifest["image_size"])
        self.defended = self.bundle.defended
        self.defended.generator = torch.Generator()
        self.noise_key = noise_key or hashlib.sha256(f"medfedpure-noise:{self.bundle.seed if seed is None else seed}"
                                                     .encode()).digest()
        self.calibration = self.defended.calibration_scores.double().numpy()
        self.lock = threading.Lock()
        self.decoding = threading.BoundedSemaphore(2)  # scans decoded at once: memory bounded under load too
        if fast_layout:  # convolutions in channels-last layout: 1.7x faster here, float rounding apart
            channels_last(self.defended.classifier, self.defended.diffusion)  # (benchmarks/run.py, tests)

    def info(self) -> dict:
        m = self.bundle.manifest
        hist, edges = np.histogram(self.calibration, bins=20)
        return {"model_id": self.bundle.model_id, "classes": self.bundle.classes, "image_size": self.image_size,
                "client": m["client"],
                "detector": m["detector"], "mode": m["mode"], "threshold": m["threshold"],
                "target_fpr": m["target_fpr"], "t_min": m["t_min"], "t_max": m["t_max"], "votes": m["votes"],
                "commit": m["run"]["commit"], "calibration": {"n": int(len(self.calibration)),
                                                               "histogram": hist.tolist(), "edges": edges.tolist()}}

    def predict_file(self, source: Path | str | bytes, name: str | None = None,
                     nifti_slice: int | None = None, views: bool = False) -> Answer:
        name = name or str(source)
        geometry: dict = {}
        with self.decoding:
            image = read_scan(source, self.image_size, name=name, nifti_slice=nifti_slice, geometry=geometry)
        return self.predict_image(image, name, views, geometry)

    def predict_image(self, image: np.ndarray, name: str, views: bool = False, geometry: dict | None = None) -> Answer:
        """`views`: also the MAE's error map (one more MAE pass per scan). `geometry`: the scan's own
        width, height and channels (before the resize), checked against the hospital's scans."""
        pixels = np.ascontiguousarray(image, dtype=np.uint8)
        x = torch.from_numpy(pixels.copy()).float().div(255).unsqueeze(0)
        noise = int.from_bytes(hmac.new(self.noise_key, pixels.tobytes(), hashlib.sha256).digest()[:8], "little")
        with self.lock, torch.inference_mode():
            self.defended.generator.manual_seed(noise)  # this scan's noise: the same on every submission
            out = self.defended.details(x)
            others = torch.empty(0, dtype=torch.long)
            if self.stability_draws and bool(out.t_star[0] > 0):  # purified: other noise, maybe another answer
                self.defended.generator.manual_seed(noise ^ 0x5EED)
                others = self.defended.sample_logits(x, self.stability_draws, out.scores)[:, 0].argmax(-1)
            errors = self.bundle.mae.error_map(x)[0] if views else None
        probs = torch.softmax(out.logits[0], dim=0).double()
        label = int(probs.argmax())
        agreement = (1 + int((others == label).sum())) / (1 + len(others)) if len(others) else 1.0
        score = float(out.scores[0])
        threshold = self.defended.threshold()
        if not bool(torch.isfinite(probs).all()):  # never an answer computed on NaN
            raise ValueError(f"{name}: the model's output is not finite (NaN or infinite); the scan is not answered")
        report = {"file": name, "model_id": self.bundle.model_id, "label": self.bundle.classes[label],
                  "probability": round(float(probs[label]), 6),
                  "probabilities": {c: round(float(p), 6) for c, p in zip(self.bundle.classes, probs)},
                  "detector": self.bundle.manifest["detector"], "score": score,
                  "score_percentile": round(float((self.calibration <= score).mean() * 100), 2),
                  "threshold": threshold, "flagged": bool(out.flags[0]), "t_star": int(out.t_star[0]),
                  "mode": self.defended.defense.mode,
                  # how stable the answer is: the share of 1 + stability_draws purifications that agree with it
                  # (1.0 where nothing was purified: no noise); below 0.8 it asks for review
                  "agreement": round(agreement, 4), "draws": 1 + len(others)}
        # far from the hospital's own scans (its clean validation scans' statistics): say why, and ask for review
        report["out_of_domain"] = out_of_domain(pixels, self.bundle.manifest.get("domain"), geometry)
        report["review"] = agreement < 0.8 or bool(report["out_of_domain"])
        error_map = None
        if errors is not None:
            grid = int(round(errors.numel() ** 0.5))
            error_map = torch.nn.functional.interpolate(errors.reshape(1, 1, grid, grid), size=image.shape[1:],
                                                        mode="nearest")[0, 0].numpy()
        return Answer(report, image.transpose(1, 2, 0), _to_uint8(out.purified[0]), error_map)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def png_bytes(image: np.ndarray, colormap: str | None = None, scale: int = 4) -> bytes:
    """A PNG of an RGB uint8 image, or of a float map through a matplotlib colormap; enlarged
    `scale` times (nearest) so a 64-px scan is readable on screen."""
    if colormap is not None:
        from matplotlib import colormaps

        lo, hi = float(image.min()), float(image.max())
        norm = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
        image = (colormaps[colormap](norm)[..., :3] * 255).round().astype(np.uint8)
    img = Image.fromarray(image)
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def save_views(answer: Answer, folder: Path, stem: str) -> dict[str, str]:
    """`<stem>_scan.png` (the model's input), `<stem>_purified.png` and `<stem>_mae_error.png` in
    `folder`; returns their paths. The caller makes `stem` unique per scan."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {view: folder / f"{stem}_{view}.png" for view in ("scan", "purified", "mae_error")}
    paths["scan"].write_bytes(png_bytes(answer.scan))
    paths["purified"].write_bytes(png_bytes(answer.purified))
    paths["mae_error"].write_bytes(png_bytes(answer.error_map, colormap="magma"))
    return {k: str(v) for k, v in paths.items()}
