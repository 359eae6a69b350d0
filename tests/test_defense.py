"""MAE detector, diffusion purifier, decision rules and the defended classifier."""

import math

import numpy as np
import pytest
import torch

from medfedpure.config import DefenseConfig
from medfedpure.defense import (PHASES, DefendedClassifier, DisagreementDetector, MAEDetector, ResidualDetector,
                                build_diffusion, build_mae)
from medfedpure.defense.rules import adaptive_depth, calibrate_threshold, rank_flags
from medfedpure.defense.trainer import eval_loss, load_pretrained, train_epochs
from medfedpure.defense.evaluation import evaluate_defense
from medfedpure.metrics import auroc
from medfedpure.attacks import make_pgd
from medfedpure.methods import new_model, task
from medfedpure.methods.medfedpure import train_local
from medfedpure.storage import save_tensors

from conftest import demo


@pytest.fixture(scope="module")
def cfg():
    c = demo()
    c.data.num_clients = 1
    c.data.val_fraction = 0.2
    c.data.synthetic_per_class = 300
    return c


@pytest.fixture(scope="module")
def loaders(cfg):
    train, test, n_classes = task.client_loaders(cfg, 0, batch_size=32)
    return train, test, task.validation_loader(cfg, 0), n_classes


@pytest.fixture(scope="module")
def trained(cfg, loaders):
    """Tiny MAE, diffusion model and classifier trained on the built-in data."""
    train, test, _, n_classes = loaders
    torch.manual_seed(0)
    mae, diffusion = build_mae(cfg), build_diffusion(cfg)
    before = {"mae": eval_loss(PHASES["mae"], mae, test), "diffusion": eval_loss(PHASES["diffusion"], diffusion, test)}
    train_epochs(PHASES["mae"], mae, train, 3, 1e-3)
    train_epochs(PHASES["diffusion"], diffusion, train, 3, 2e-3)
    after = {"mae": eval_loss(PHASES["mae"], mae, test), "diffusion": eval_loss(PHASES["diffusion"], diffusion, test)}
    classifier = new_model(cfg, n_classes, 0)
    cfg.train.local_epochs = 6
    train_local(classifier, task.client_loaders(cfg, 0, batch_size=16)[0], cfg)
    return {"mae": mae.eval(), "diffusion": diffusion.eval(), "classifier": classifier.eval(),
            "before": before, "after": after}


def test_training_lowers_the_losses(trained):
    for name in ("mae", "diffusion"):
        assert trained["after"][name] < 0.5 * trained["before"][name], name


def test_mae_loss_is_on_masked_patches_of_raw_pixels(cfg):
    mae = build_mae(cfg).eval()
    x = torch.rand(2, 3, 32, 32)
    loss, pred, mask = mae(x, generator=torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [48.0, 48.0]  # 75% of 64 patches
    per_patch = ((pred - mae.patchify(x)) ** 2).mean(-1)
    assert torch.isclose(loss, (per_patch * mask).sum() / mask.sum())
    assert torch.equal(mae.unpatchify(mae.patchify(x)), x)


def test_mae_score_is_deterministic_and_batch_independent(trained, loaders):
    mae = trained["mae"]
    x = next(iter(loaders[1]))[0][:8]
    with torch.no_grad():
        a, b, single = mae.score(x), mae.score(x), mae.score(x[:1])
    assert torch.equal(a, b)
    assert torch.allclose(a[:1], single, atol=1e-6)
    covered = torch.zeros(mae.num_patches)
    for keep in mae.complementary_keeps():
        covered[keep] += 1
    assert covered.min() >= 1  # every patch is visible in some pass and masked in the others


def test_mae_separates_clean_from_strongly_perturbed(trained, loaders):
    mae = trained["mae"]
    x = torch.cat([b[0] for b in loaders[1]])
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    with torch.no_grad():
        assert auroc(mae.score(x).numpy(), mae.score(noisy).numpy()) >= 0.9


def test_closed_form_noising_matches_the_schedule(cfg):
    diffusion = build_diffusion(cfg)
    betas = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    t = torch.tensor([1, 10, 500, 1000])
    assert torch.allclose(diffusion.abar(t).double(), abar[t - 1], rtol=1e-5)
    assert diffusion.abar(torch.tensor([0])).item() == 1.0
    # iterating Eq. 13 step by step gives the same mean and variance as Eq. 17
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    x = x0.clone()
    for s in range(50):
        x = (1 - betas[s]).sqrt().float() * x + betas[s].sqrt().float() * torch.randn_like(x)
    closed = diffusion.q_sample(x0, torch.full((20000,), 50), torch.randn_like(x0))
    assert abs(x.mean() - closed.mean()) < 0.01 and abs(x.var() - closed.var()) < 0.01
    assert abs(closed.mean() - 0.7 * abar[49].sqrt()) < 0.01


@pytest.mark.parametrize("sampler, steps", [("ddim", 1), ("ddim", 3), ("ddpm", 1)])
def test_purification_denoises_and_keeps_range(trained, loaders, sampler, steps):
    diffusion = trained["diffusion"]
    x = next(iter(loaders[1]))[0][:16]
    t = torch.full((16,), 60)
    gen = torch.Generator().manual_seed(0)
    noisy = ((diffusion.q_sample(x * 2 - 1, t, torch.randn(x.shape, generator=gen)) + 1) / 2).clamp(0, 1)
    with torch.no_grad():
        out = diffusion.purify(x, t, sampler, steps, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert ((out - x) ** 2).mean() < 0.5 * ((noisy - x) ** 2).mean()
    untouched = diffusion.purify(x, torch.zeros(16, dtype=torch.long), sampler, steps)
    assert torch.equal(untouched, x)


def test_rank_rule_flags_exactly_ceil_kappa_n():
    for n, kappa in [(10, 0.18), (100, 0.05), (7, 0.5), (33, 0.18)]:
        scores = torch.rand(n)
        flags = rank_flags(scores, kappa)
        assert flags.sum().item() == math.ceil(kappa * n)
        assert scores[flags].min() >= scores[~flags].max()


def test_calibrated_threshold_gives_the_target_fpr():
    gen = torch.Generator().manual_seed(0)
    calib, held_out = torch.randn(2000, generator=gen), torch.randn(20000, generator=gen)
    for fpr in (0.05, 0.18):
        tau = calibrate_threshold(calib, fpr)
        observed = (held_out > tau).float().mean().item()
        assert abs(observed - fpr) < 3 * math.sqrt(fpr * (1 - fpr) / 2000)


def test_adaptive_depth_is_monotone_and_bounded():
    calib = torch.linspace(0, 1, 101)
    t = adaptive_depth(torch.tensor([-1.0, 0.5, 0.9, 5.0]), calib, 20, 100)
    assert t.tolist()[0] == 20 and t.tolist()[-1] == 100 and t.tolist() == sorted(t.tolist())


def _defended(trained, mode, rule="threshold", tau=None, detector="mae"):
    det = {"mae": MAEDetector(trained["mae"]), "residual": ResidualDetector(trained["diffusion"]),
           "disagreement": DisagreementDetector(trained["diffusion"], trained["classifier"])}[detector]
    calib = torch.rand(50)
    defense = DefenseConfig(mode=mode, rule=rule, kappa=0.25, t_min=20, t_max=80)
    return DefendedClassifier(trained["classifier"], det, trained["diffusion"], defense, tau, calib)


def test_the_defended_classifier_checks_its_section_and_threshold():
    parts = (torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity())
    with pytest.raises(ValueError, match="needs a calibrated tau"):
        DefendedClassifier(*parts, DefenseConfig(mode="selective", rule="threshold"), None, torch.rand(10))
    with pytest.raises(ValueError, match="defense mode must be one of"):
        DefendedClassifier(*parts, DefenseConfig(mode="always"), 0.5, torch.rand(10))
    with pytest.raises(ValueError, match="t_min <= t_max"):
        DefendedClassifier(*parts, DefenseConfig(t_min=50, t_max=20), 0.5, torch.rand(10))
    for ok in (DefenseConfig(mode="off"), DefenseConfig(rule="rank")):  # no tau needed
        assert DefendedClassifier(*parts, ok, None, torch.rand(10)).defense is ok


def test_unflagged_scans_pass_bit_identical(trained, loaders):
    x = next(iter(loaders[1]))[0][:12]
    defended = _defended(trained, "selective", rule="rank")
    with torch.no_grad():
        out = defended.details(x)
    assert out.flags.sum() == 3
    assert torch.equal(out.purified[~out.flags], x[~out.flags])
    assert not torch.equal(out.purified[out.flags], x[out.flags])
    assert (out.t_star[~out.flags] == 0).all() and (out.t_star[out.flags] >= 20).all()
    with torch.no_grad():
        assert torch.allclose(out.logits[~out.flags], trained["classifier"](x[~out.flags]), atol=1e-5)
    graded = _defended(trained, "graded", rule="rank")
    with torch.no_grad():
        g = graded.details(x)
    assert (g.t_star[~g.flags] == 20).all() and (g.t_star >= 20).all()


@pytest.mark.parametrize("mode", ["selective", "graded"])
def test_the_detectors_own_logits_serve_the_scans_left_unpurified(trained, loaders, mode):
    """The disagreement detector runs the classifier on every scan anyway; a scan left unpurified
    takes those logits instead of a second classifier call. The answers do not change."""
    x = next(iter(loaders[1]))[0][:12]
    defended = _defended(trained, mode, rule="rank", detector="disagreement")
    defended.generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        out = defended.details(x)
        defended.generator.manual_seed(3)
        scores, flags, t_star = defended.decide(x)
        before = defended.classify([defended.purify(x, t_star)])  # one classifier call on every view
    assert torch.equal(out.scores, scores) and torch.equal(out.flags, flags) and torch.equal(out.t_star, t_star)
    assert torch.equal(out.logits.argmax(1), before.argmax(1)) and torch.allclose(out.logits, before, atol=1e-5)
    quiet = _defended(trained, mode, tau=float("inf"), detector="disagreement")  # nothing flagged
    with torch.no_grad():
        logits = quiet(x)
        assert torch.equal(logits, trained["classifier"](x)) == (mode == "selective")


@pytest.mark.parametrize("detector", ["mae", "residual", "disagreement"])
def test_gradients_reach_the_input_through_the_whole_pipeline(trained, loaders, detector):
    x = next(iter(loaders[1]))[0][:6].clone().requires_grad_(True)
    y = next(iter(loaders[1]))[1][:6]
    defended = _defended(trained, "graded", rule="threshold", tau=-1.0, detector=detector)  # everything flagged
    out = defended.details(x)
    loss = torch.nn.functional.cross_entropy(out.logits, y) + out.scores.sum()
    loss.backward()
    assert out.flags.all()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_detector_scores_are_deterministic(trained, loaders):
    x = next(iter(loaders[1]))[0][:8]
    for det in (ResidualDetector(trained["diffusion"]), DisagreementDetector(trained["diffusion"], trained["classifier"])):
        with torch.no_grad():
            assert torch.equal(det(x), det(x))
            assert torch.allclose(det(x)[:2], det(x[:2]), atol=1e-5)


def test_defense_evaluation_reports_everything(cfg, trained, loaders):
    _, test, val, _ = loaders
    classifier = trained["classifier"]
    metrics, examples, calibration = evaluate_defense(
        classifier, trained["mae"], trained["diffusion"], val, test, make_pgd(classifier, cfg.attack, 0),
        DefenseConfig(t_min=20, t_max=80, target_fpr=0.05), ["mae", "residual"], ["selective", "graded"])
    assert metrics["bare.clean_acc"] > 0.8 and metrics["bare.adv_acc"] < metrics["bare.clean_acc"] - 0.2
    for det in ("mae", "residual"):
        assert 0 <= metrics[f"{det}.auroc"] <= 1
        for mode in ("selective", "graded"):
            for k in ("clean_acc", "adv_acc", "clean_purified", "adv_mean_t", "adv_purify_ms", "clean_score_ms"):
                assert f"{mode}.{det}.{k}" in metrics
        assert metrics[f"graded.{det}.clean_purified"] == 1.0
    assert examples["original"].shape == examples["purified"].shape
    assert examples["mae_error"].shape == (4, 64)
    assert set(calibration) == {"mae", "residual"}
    assert metrics["mae.tau"] == pytest.approx(calibrate_threshold(calibration["mae"], 0.05))


def test_checkpoint_round_trip_and_mismatch(cfg, trained, tmp_path):
    save_tensors(tmp_path / "mae.safetensors", trained["mae"].state_dict())
    back = load_pretrained("mae", cfg, tmp_path / "mae.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), trained["mae"].state_dict().values()))
    with pytest.raises(ValueError, match="does not match"):
        load_pretrained("diffusion", cfg, tmp_path / "mae.safetensors")


def test_auroc():
    assert auroc(np.array([0, 1, 2]), np.array([3, 4])) == 1.0
    assert auroc(np.array([3, 4]), np.array([0, 1, 2])) == 0.0
    assert auroc(np.array([1, 1]), np.array([1, 1])) == 0.5


def test_channels_last_changes_only_float_rounding_of_the_classifier_and_the_purifier():
    """`loop.channels_last` (what predict/serve use): the MoE's logits and the U-Net's one-step x0
    agree with the default layout to float rounding."""
    from medfedpure.defense import build_diffusion
    from medfedpure.loop import channels_last
    from medfedpure.methods import new_model

    cfg = demo()
    torch.manual_seed(0)
    x = torch.rand(16, 3, 32, 32)
    t = torch.full((16,), 60)
    results = []
    for convert in (False, True):
        clf, diffusion = new_model(cfg, 2, 0).eval(), build_diffusion(cfg).eval()
        if convert:
            channels_last(clf, diffusion)
            convs = [m for m in (*clf.modules(), *diffusion.modules()) if isinstance(m, torch.nn.Conv2d)]
            assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
        with torch.inference_mode():
            results.append((clf(x), diffusion.predict_x0(x * 2 - 1, t)[0]))
    (logits_a, x0_a), (logits_b, x0_b) = results
    assert torch.allclose(logits_a, logits_b, atol=1e-5) and torch.equal(logits_a.argmax(1), logits_b.argmax(1))
    assert torch.allclose(x0_a, x0_b, atol=1e-5)


def test_phase_4_fine_tunes_the_purifier_alone_against_the_frozen_classifier(cfg, trained, loaders):
    """The U-Net learns; the classifier (weights, BatchNorm statistics, mode, requires_grad) is left
    exactly as it was; the objective is the sum of its three terms; held-out figures are reproducible."""
    import copy

    from medfedpure.defense.finetune import _target, evaluate_purifier, finetune_purifier, purifier_loss

    train, test, _, _ = loaders
    c = copy.deepcopy(cfg)
    c.defense.t_min, c.defense.t_max, c.attack.steps = 20, 60, 2
    c.defense.purifier.rounds, c.defense.purifier.lr = 1, 1e-3
    classifier, diffusion = copy.deepcopy(trained["classifier"]), copy.deepcopy(trained["diffusion"])
    classifier.train()  # as a caller might leave it: phase 4 must still not move its BatchNorm statistics
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    unet_before = {k: v.clone() for k, v in diffusion.state_dict().items()}
    x, y = next(iter(test))
    held_out = [(x[:8], y[:8])]
    first = evaluate_purifier(diffusion, classifier, held_out, c)
    assert first == evaluate_purifier(diffusion, classifier, held_out, c)  # fixed seed: the same figures
    assert 0 <= first["adv_acc"] <= first["clean_acc"] + 0.25 and first["denoise_loss"] > 0
    stats = finetune_purifier(diffusion, classifier, [(x[8:24], y[8:24])] * 3, c, seed=5)
    assert {"loss", "adv_loss", "clean_loss", "denoise_loss", "adv_acc", "clean_acc"} <= set(stats)
    assert all(torch.equal(before[k], v) for k, v in classifier.state_dict().items())
    assert classifier.training and all(p.requires_grad for p in classifier.parameters())  # left as it was
    assert any(not torch.equal(unet_before[k], v) for k, v in diffusion.state_dict().items())
    # the objective is the adversarial term plus the weighted clean and denoising terms
    target, attack = _target(classifier, diffusion, c, seed=1)
    x_adv = attack(x[:4], y[:4])
    c.defense.purifier.clean_weight, c.defense.purifier.denoise_weight = 0.0, 0.0
    target.generator.manual_seed(0)
    alone, parts = purifier_loss(target, x[:4], x_adv, y[:4], c)
    target.generator.manual_seed(0)
    expected = torch.nn.functional.cross_entropy(target(x_adv), y[:4]).detach()
    assert float(alone.detach()) == pytest.approx(float(expected))
    assert set(parts) == {"adv_loss", "adv_correct"}
    alone.backward()  # through the purification into the U-Net's weights
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in diffusion.parameters())
    # phase 4's own training attack where defense.purifier.adv_* name one, phase 3's otherwise
    c.method.adv_attack = "n-fgsm"
    assert _target(classifier, diffusion, c, seed=1)[1].name == "n-fgsm"
    c.defense.purifier.adv_attack, c.defense.purifier.adv_steps = "pgd", 3
    _, pgd = _target(classifier, diffusion, c, seed=1)
    assert (pgd.name, pgd.steps, pgd.eps) == ("pgd", 3, c.attack.eps) and c.method.adv_attack == "n-fgsm"
    c.method.adv_attack, c.defense.adv_attack, c.defense.purifier.adv_attack = "pgd", "n-fgsm", None
    assert _target(classifier, diffusion, c, seed=1)[1].name == "n-fgsm"  # phase 3's: defense.adv_attack
