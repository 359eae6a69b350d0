"""One hospital's defense evaluated on its test split under the paper's protocol.

PGD is crafted on the bare personalized classifier, then the adversarial scans go through
the defended pipeline. Reported per detector and mode: clean and adversarial accuracy,
detection AUROC, TPR/FPR at the rule's operating point, share purified, mean t*, and
latency per stage.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.data import DataLoader

from medfedpure.attacks import PGD
from medfedpure.config import DefenseConfig
from medfedpure.defense.detectors import build_detector
from medfedpure.defense.diffusion import GaussianDiffusion
from medfedpure.defense.mae import MaskedAutoencoder
from medfedpure.defense.pipeline import DefendedClassifier
from medfedpure.defense.rules import calibrate_threshold
from medfedpure.metrics import auroc, batched_accuracy


@torch.no_grad()
def _scores(detector: nn.Module, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([detector(x[i:i + batch]) for i in range(0, len(x), batch)])


def _collect(loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def evaluate_defense(classifier: nn.Module, mae: MaskedAutoencoder, diffusion: GaussianDiffusion,
                     val: DataLoader | dict[str, torch.Tensor], test_loader: DataLoader, attack: PGD,
                     defense: DefenseConfig, detectors: list[str], modes: list[str], seed: int = 0,
                     figure: tuple[str, str] | None = None
                     ) -> tuple[dict[str, float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Metrics keyed `<mode>.<detector>.<metric>` (plus bare ones), example tensors for a figure,
    and each detector's clean validation scores (its calibration, to save with the models).

    `val` is the client's clean validation loader, or the calibration scores saved earlier.
    Each detector's tau is its `defense.target_fpr` quantile of them; `defense` gives the rest
    (rule, kappa, t_min/t_max, sampler), with one purification per scan whatever `defense.votes`.
    """
    for m in (classifier, mae, diffusion):
        m.eval()
    device = next(classifier.parameters()).device
    x, y = (t.to(device) for t in _collect(test_loader))
    saved = val if isinstance(val, dict) else None
    x_val = None if saved is not None else _collect(val)[0].to(device)
    x_adv = torch.cat([attack(x[i:i + 64], y[i:i + 64]) for i in range(0, len(x), 64)])
    out: dict[str, float] = {"bare.clean_acc": batched_accuracy(classifier, x, y), "bare.adv_acc": batched_accuracy(classifier, x_adv, y),
                             "n_test": float(len(y))}
    examples: dict[str, torch.Tensor] = {}
    calibration: dict[str, torch.Tensor] = {}
    for name in detectors:
        detector = build_detector(name, mae, diffusion, classifier, seed)
        s_val = saved[name].to(device) if saved is not None else _scores(detector, x_val)
        s_clean, s_adv = _scores(detector, x), _scores(detector, x_adv)
        tau = calibrate_threshold(s_val, defense.target_fpr)
        calibration[name] = s_val
        out[f"{name}.auroc"] = auroc(s_clean.cpu().numpy(), s_adv.cpu().numpy())
        out[f"{name}.tau"] = tau
        out[f"{name}.tpr_at_tau"] = float((s_adv > tau).float().mean())
        out[f"{name}.fpr_at_tau"] = float((s_clean > tau).float().mean())
        for mode in modes:
            # one purification per scan, as this protocol has always scored (votes: the attack suite)
            setting = dataclasses.replace(defense, detector=name, mode=mode, votes=1)
            defended = DefendedClassifier(classifier, detector, diffusion, setting, tau, s_val)
            defended.generator = torch.Generator().manual_seed(seed)
            for kind, inputs in (("clean", x), ("adv", x_adv)):
                with torch.no_grad():
                    res = defended.details(inputs)
                key = f"{mode}.{name}"
                out[f"{key}.{kind}_acc"] = float((res.logits.argmax(1) == y).float().mean())
                out[f"{key}.{kind}_purified"] = float((res.t_star > 0).float().mean())
                purified = res.t_star[res.t_star > 0]
                out[f"{key}.{kind}_mean_t"] = float(purified.float().mean()) if len(purified) else 0.0
                for stage, ms in res.timings_ms.items():
                    out[f"{key}.{kind}_{stage}"] = ms
                if kind == "adv" and (name, mode) == (figure or (detectors[0], modes[-1])):
                    examples = {"original": x[:4], "attacked": x_adv[:4], "purified": res.purified[:4],
                                "labels": y[:4]}
    with torch.no_grad():
        examples["mae_error"] = mae.error_map(examples["attacked"]) if examples else torch.empty(0)
    return out, {k: v.cpu() for k, v in examples.items()}, calibration
