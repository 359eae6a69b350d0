"""The attack suite against a tiny defended classifier: the sanity checks an adaptive
evaluation must pass before its numbers mean anything, and the scoring of a stochastic defense."""

import pytest
import torch
from torch import nn

from medfedpure.metrics import clopper_pearson
from medfedpure.attacks import (BPDA, PGD, SUITE, DetectorAwarePGD, OrthogonalPGD, Square, attack_loss, build_attack,
                                parse_attack_name, parse_attacks, valid_attack_name)
from medfedpure.attacks.orthogonal import remove_component
from medfedpure.config import AttackConfig, DefenseConfig, load_preset
from medfedpure.defense import DefendedClassifier, DisagreementDetector, build_diffusion
from medfedpure.defense.rules import calibrate_threshold
from medfedpure.defense.trainer import PHASES, train_epochs
from medfedpure.evaluation.robustness import Tally, answer, attack_cost, fixed_noise, mcnemar, run_suite, scan_ids
from medfedpure.methods import new_model, task
from medfedpure.methods.medfedpure import train_local

from conftest import demo


@pytest.fixture(scope="module")
def parts():
    """A small MoE and diffusion model trained on the built-in data, and 32 test scans."""
    cfg = demo()
    cfg.data.num_clients = 1
    cfg.data.val_fraction = 0.2
    cfg.data.synthetic_per_class = 300
    torch.manual_seed(0)
    train, test, n_classes = task.client_loaders(cfg, 0, batch_size=32)
    diffusion = build_diffusion(cfg)
    train_epochs(PHASES["diffusion"], diffusion, train, 3, 2e-3)
    classifier = new_model(cfg, n_classes, 0)
    cfg.train.local_epochs = 6
    train_local(classifier, task.client_loaders(cfg, 0, batch_size=16)[0], cfg)
    xs, ys = zip(*test)
    x, y = torch.cat(xs)[::3][:32], torch.cat(ys)[::3][:32]
    val = torch.cat([b[0] for b in task.validation_loader(cfg, 0)])
    return {"classifier": classifier.eval(), "diffusion": diffusion.eval(), "x": x, "y": y, "val": val}


def defended(parts, mode="graded", votes=1, seed=0):
    detector = DisagreementDetector(parts["diffusion"], parts["classifier"])
    with torch.no_grad():
        calib = detector(parts["val"])
    defense = DefenseConfig(mode=mode, t_min=20, t_max=60, votes=votes)
    model = DefendedClassifier(parts["classifier"], detector, parts["diffusion"], defense,
                               calibrate_threshold(calib, 0.05), calib).eval()
    model.generator = torch.Generator().manual_seed(seed)
    return model


def first_draw_accuracy(model, x, y, seed=123):
    model.generator.manual_seed(seed) if getattr(model, "generator", None) is not None else None
    return answer(model, x, y, 1)[0].float().mean().item()


def test_the_tiny_defense_works_before_it_is_attacked(parts):
    model = defended(parts)
    assert first_draw_accuracy(parts["classifier"], parts["x"], parts["y"]) >= 0.8
    assert first_draw_accuracy(model, parts["x"], parts["y"]) >= 0.7


def test_eot_pgd_on_the_bare_classifier_equals_pgd(parts):
    x, y, model = parts["x"], parts["y"], parts["classifier"]
    plain = PGD(model, eps=0.03, alpha=0.01, steps=5, seed=3)(x, y)
    eot = PGD(model, eps=0.03, alpha=0.01, steps=5, seed=3, eot=4)(x, y)
    assert torch.equal(plain, eot)
    cfg = AttackConfig(eps=0.03, alpha=0.01, adaptive_steps=5, eot=4)
    suite = build_attack("eot-pgd", model, cfg, seed=3)
    best = PGD(model, eps=0.03, alpha=0.01, steps=5, seed=3, keep_best=True)(x, y)
    assert suite.eot == 1 and torch.equal(suite(x, y), best)  # a deterministic model gets one pass per step
    with torch.no_grad():  # the kept iterate is never worse than the last one
        assert (attack_loss(model(best), y) >= attack_loss(model(plain), y) - 1e-6).all()


def test_unbounded_eps_drives_the_defended_accuracy_to_zero(parts):
    model = defended(parts)
    x, y = parts["x"], parts["y"]
    adv = PGD(model, eps=1.0, alpha=0.1, steps=20, eot=2, seed=0)(x, y)
    assert first_draw_accuracy(model, adv, y) <= 0.05


def _success(attack, model, x, y, seeds=(11, 12)):
    """Attack success rate (first draw), averaged over two answer seeds."""
    adv = attack(x, y)
    return 1 - sum(first_draw_accuracy(model, adv, y, s) for s in seeds) / len(seeds)


def test_more_steps_or_more_draws_never_help_the_defense_beyond_noise(parts):
    model = defended(parts)
    x, y = parts["x"], parts["y"]
    budget = {"eps": 0.06, "alpha": 0.015, "seed": 5}
    weak = _success(PGD(model, steps=3, eot=1, **budget), model, x, y)
    more_steps = _success(PGD(model, steps=12, eot=1, **budget), model, x, y)
    more_draws = _success(PGD(model, steps=3, eot=4, **budget), model, x, y)
    noise = 2 * (0.25 / len(y)) ** 0.5  # two standard errors of a rate near one half
    assert 0.0 < weak < 1.0, weak  # the budget leaves room both ways
    assert more_steps >= weak - noise and more_draws >= weak - noise, (weak, more_steps, more_draws)


def test_every_gradient_attack_stays_in_the_ball_and_hurts_the_defense(parts):
    model = defended(parts)
    x, y = parts["x"], parts["y"]
    clean = first_draw_accuracy(model, x, y)
    for cls in (PGD, BPDA, DetectorAwarePGD):
        adv = cls(model, eps=0.06, alpha=0.015, steps=8, eot=2, seed=1)(x, y)
        assert (adv - x).abs().max() <= 0.06 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        assert first_draw_accuracy(model, adv, y) < clean - 0.2, cls.name


def test_bpda_without_a_purifier_is_pgd_and_its_backward_is_the_identity(parts):
    x, y, model = parts["x"][:8], parts["y"][:8], parts["classifier"]
    assert torch.equal(BPDA(model, eps=0.03, alpha=0.01, steps=3, seed=2)(x, y),
                       PGD(model, eps=0.03, alpha=0.01, steps=3, seed=2)(x, y))
    d = defended(parts)
    attack = BPDA(d, eps=0.03, alpha=0.01, steps=1, seed=2)
    # identity backward through purification: the gradient of the classifier at the purified scans
    d.generator.manual_seed(7)
    g = attack.gradient(x, y)
    d.generator.manual_seed(7)
    with torch.no_grad():
        views = d.purify_draws(x, 1)[0]
    p = views[0].clone().requires_grad_(True)
    expected, = torch.autograd.grad(attack_loss(parts["classifier"](p), y).sum(), p)
    assert torch.allclose(g, expected, atol=1e-6)


def test_detector_aware_attack_keeps_the_score_lower(parts):
    model = defended(parts, mode="selective")
    x, y = parts["x"], parts["y"]
    kwargs = {"eps": 0.06, "alpha": 0.015, "steps": 10, "eot": 1, "seed": 4}
    # how far plain PGD raises the score depends on the tiny models' training (and so on the CPU's
    # arithmetic): put tau where it flags some of plain PGD's scans, so there is something to evade
    probe = PGD(model, keep_best=True, **kwargs)(x, y)
    with torch.no_grad():
        model.tau = float(model.detector(probe).quantile(0.25))
    plain = PGD(model, keep_best=True, **kwargs)(x, y)
    quiet = DetectorAwarePGD(model, weight=10.0, keep_best=True, **kwargs)(x, y)
    with torch.no_grad():
        s_plain, s_quiet = model.detector(plain), model.detector(quiet)
    tau = model.threshold()
    assert (s_plain > tau).float().mean() >= 0.1
    assert (s_quiet > tau).float().mean() < (s_plain > tau).float().mean()
    assert s_quiet.mean() < s_plain.mean()


def test_remove_component_leaves_what_is_orthogonal():
    g, a = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    r = remove_component(g, a)
    assert torch.allclose((r * a).flatten(1).sum(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(remove_component(g, torch.zeros_like(a)), g)  # nothing to remove


def _evaded(model, adv, y):
    """Per scan: unflagged and answered wrongly (selective mode: the answer is deterministic)."""
    with torch.no_grad():
        quiet = ~model.flags_for(model.detector(adv))
        return quiet & (model(adv).argmax(1) != y)


def test_orthogonal_attack_evades_the_detector_at_least_as_well_as_a_fixed_penalty(parts):
    model = defended(parts, mode="selective")
    x, y = parts["x"], parts["y"]
    assert not model.unflagged_stochastic and defended(parts).unflagged_stochastic
    kwargs = {"eps": 0.06, "alpha": 0.015, "steps": 10, "eot": 1, "seed": 4, "keep_best": True}
    ortho = OrthogonalPGD(model, **kwargs)(x, y)
    assert (ortho - x).abs().max() <= 0.06 + 1e-6 and ortho.min() >= 0 and ortho.max() <= 1
    evaded = _evaded(model, ortho, y)
    penalty = _evaded(model, DetectorAwarePGD(model, weight=10.0, **kwargs)(x, y), y)
    assert evaded.float().mean() >= 0.3 and evaded.sum() >= penalty.sum(), (evaded.sum(), penalty.sum())
    # the unflagged answer it fools is the defense's own: the bare classifier on the scan
    with torch.no_grad():
        assert torch.equal(model.unflagged_logits(ortho, 1)[0], model.classifier(ortho))


def test_orthogonal_attack_without_a_detector_is_eot_pgd(parts):
    x, y, model = parts["x"][:8], parts["y"][:8], parts["classifier"]
    kwargs = {"eps": 0.03, "alpha": 0.01, "steps": 3, "seed": 2, "keep_best": True}
    assert torch.equal(OrthogonalPGD(model, **kwargs)(x, y), PGD(model, **kwargs)(x, y))


class _Quantized(nn.Module):
    """A classifier behind a step function: its gradient is zero everywhere (masked)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.round(x * 8) / 8)


def test_square_finds_what_masked_gradients_hide(parts):
    x, y = parts["x"], parts["y"]
    masked = _Quantized(parts["classifier"]).eval()
    eps = 0.25
    pgd = PGD(masked, eps=eps, alpha=0.05, steps=10, random_start=False)(x, y)
    square = Square(masked, eps=eps, n_queries=150, p_init=0.3, seed=0)(x, y)
    assert (square - x).abs().max() <= eps + 1e-6 and square.min() >= 0 and square.max() <= 1
    with torch.no_grad():
        acc_pgd = (masked(pgd).argmax(1) == y).float().mean()
        acc_square = (masked(square).argmax(1) == y).float().mean()
    assert torch.equal(pgd, x)  # zero gradient: PGD never moved
    assert acc_square < acc_pgd - 0.3, (acc_pgd, acc_square)


def test_square_agrees_with_torchattacks_on_the_bare_classifier(parts):
    torchattacks = pytest.importorskip("torchattacks")
    x, y, model = parts["x"], parts["y"], parts["classifier"]
    eps = 0.1
    ours = Square(model, eps=eps, n_queries=200, p_init=0.3, seed=0)(x, y)
    theirs = torchattacks.Square(model, eps=eps, n_queries=200, p_init=0.3, loss="margin", seed=0)(x, y)
    with torch.no_grad():
        a_ours = (model(ours).argmax(1) == y).float().mean().item()
        a_theirs = (model(theirs).argmax(1) == y).float().mean().item()
    assert abs(a_ours - a_theirs) <= 0.25, (a_ours, a_theirs)
    assert a_ours < first_draw_accuracy(model, x, y) - 0.3


def test_l2_square_stays_on_the_ball_and_agrees_with_torchattacks_on_the_bare_classifier(parts):
    """attack.norm=l2 (Table I): the Square attack's l_2 version, the gradient-free check there too."""
    from medfedpure.attacks.square import SquareL2, pseudo_gaussian

    eta = pseudo_gaussian(5, False)
    assert eta.norm().item() == pytest.approx(1.0) and eta[:2].sum() > 0 > eta[2:].sum()
    assert torch.equal(pseudo_gaussian(5, True), eta.t())
    x, y, model = parts["x"], parts["y"], parts["classifier"]
    eps = 1.5
    ours = SquareL2(model, eps=eps, n_queries=200, p_init=0.3, seed=0)(x, y)
    assert (ours - x).flatten(1).norm(dim=1).max() <= eps + 1e-4 and ours.min() >= 0 and ours.max() <= 1
    built = build_attack("square", model, AttackConfig(norm="l2", eps=eps, square_queries=10), seed=0)
    assert isinstance(built, SquareL2) and built.describe()["norm"] == "l2"
    with torch.no_grad():
        a_ours = (model(ours).argmax(1) == y).float().mean().item()
    assert a_ours < first_draw_accuracy(model, x, y) - 0.3
    torchattacks = pytest.importorskip("torchattacks")
    theirs = torchattacks.Square(model, norm="L2", eps=eps, n_queries=200, p_init=0.3, loss="margin", seed=0)(x, y)
    with torch.no_grad():
        a_theirs = (model(theirs).argmax(1) == y).float().mean().item()
    assert abs(a_ours - a_theirs) <= 0.25, (a_ours, a_theirs)


def test_apgd_stays_in_the_ball_agrees_with_torchattacks_and_attacks_the_defense_through_eot(parts):
    """Auto-PGD (AutoAttack's gradient attack): its checkpoints are the paper's, it keeps each scan's best
    point in the ball, on the bare classifier it is as strong as torchattacks' APGD, and through the
    defense it follows EOT gradients like eot-pgd."""
    from medfedpure.attacks.apgd import APGD, checkpoints

    assert checkpoints(50) == [11, 21, 30, 38, 45] and checkpoints(1) == [1]
    x, y, model = parts["x"], parts["y"], parts["classifier"]
    eps = 0.05
    for norm, budget in (("linf", eps), ("l2", 1.0)):
        ours = APGD(model, eps=budget, steps=20, norm=norm, seed=0)(x, y)
        size = (ours - x).abs().flatten(1).max(1).values if norm == "linf" else (ours - x).flatten(1).norm(dim=1)
        assert size.max() <= budget + 1e-5 and ours.min() >= 0 and ours.max() <= 1
    ours = APGD(model, eps=eps, steps=20, seed=0)(x, y)
    torchattacks = pytest.importorskip("torchattacks")
    theirs = torchattacks.APGD(model, norm="Linf", eps=eps, steps=20, loss="ce", seed=0)(x, y)
    with torch.no_grad():
        a_ours, a_theirs = ((model(a).argmax(1) == y).float().mean().item() for a in (ours, theirs))
    assert abs(a_ours - a_theirs) <= 0.15 and a_ours < first_draw_accuracy(model, x, y) - 0.3, (a_ours, a_theirs)
    target = defended(parts)
    built = build_attack("apgd:margin", target, AttackConfig(eps=eps, adaptive_steps=5, eot=2), seed=0)
    assert isinstance(built, APGD) and (built.eot, built.loss, built.steps) == (2, "margin", 5)
    assert "alpha" not in built.describe()
    adv = built(x[:8], y[:8])
    assert (adv - x[:8]).abs().max() <= eps + 1e-6


def test_votes_average_the_probabilities_of_independent_purifications(parts):
    x = parts["x"][:6]
    one, three = defended(parts, votes=1, seed=9), defended(parts, votes=3, seed=9)
    with torch.no_grad():
        views = three.purify_draws(x, 1)[0]
        assert len(views) == 3 and not torch.equal(views[0], views[1])
        expected = torch.stack([torch.softmax(parts["classifier"](v), 1) for v in views]).mean(0).log()
        assert torch.allclose(three.classify(views), expected, atol=1e-5)
        assert one.sample_logits(x, 4).shape == (4, 6, 2)


def test_clopper_pearson_matches_known_intervals():
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.3085, abs=1e-4)
    lo, hi = clopper_pearson(5, 10)
    assert lo == pytest.approx(0.1871, abs=1e-4) and hi == pytest.approx(0.8129, abs=1e-4)
    assert clopper_pearson(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        clopper_pearson(0, 0)


def test_first_majority_and_worst_of_n():
    correct = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 0]], dtype=torch.bool)  # 3 draws x 4 scans
    t = Tally.from_draws(correct)
    assert (t.n, t.first, t.majority, t.worst) == (4, 3, 3, 1)
    r = (t + t).rates()
    assert r["n"] == 8 and r["first"] == 0.75 and r["worst"] == 0.25
    assert r["first_ci"][0] < 0.75 < r["first_ci"][1]
    assert Tally().rates()["first"] is None  # a rate over nothing is not 0%
    assert Tally.verdicts(correct) == {"first": "1101", "majority": "1101", "worst": "1000"}


def test_mcnemar_exact_test_on_paired_outcomes():
    r = mcnemar("000000" + "1111", "111111" + "1111")  # 6 discordant scans, all won by b
    assert (r["only_a"], r["only_b"], r["n"]) == (0, 6, 10)
    assert r["p_value"] == pytest.approx(2 * 0.5 ** 6)  # exact two-sided binomial tail
    assert mcnemar("1010", "1010")["p_value"] == 1.0  # no discordant pair: no evidence either way
    assert mcnemar("10" * 10, "01" * 10)["p_value"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same scans"):
        mcnemar("101", "10")
    x = torch.rand(3, 3, 8, 8)
    assert scan_ids(x) == scan_ids(x.clone()) and len(set(scan_ids(x))) == 3
    assert scan_ids(x)[0] != scan_ids(x + 1e-3)[0]


def test_run_suite_scores_every_attack_on_the_same_scans(parts):
    model = defended(parts)
    x, y = parts["x"][:8], parts["y"][:8]
    cfg = AttackConfig(eps=0.03, alpha=0.01, steps=2, adaptive_steps=2, eot=2, square_queries=5, draws=3)
    work = []
    results = run_suite(model, x, y, list(SUITE), cfg, seed=0, on_batch=work.append)
    assert list(results) == ["clean", *SUITE]
    # the progress it reports is in model calls: each attack's scans times its steps x draws (queries)
    assert sum(work) == 8 * sum(attack_cost(a, cfg) for a in SUITE)
    assert [attack_cost(a, cfg) for a in ("pgd", "eot-pgd", "fixed-noise", "square", "eot-pgd@7x3")] == [2, 4, 2, 5, 21]
    for name, r in results.items():
        assert r["tally"].n == 8 and r["draws"] == (1 if name == "fixed-noise" else 3)
        assert len(r["outcomes"]["first"]) == 8 and r["outcomes"]["first"].count("1") == r["tally"].first
        assert 0 <= r["flagged"] <= 1 and r["linf"] <= 0.03 + 1e-6
    assert results["eot-pgd"]["settings"]["eot"] == 2 and results["square"]["settings"]["queries"] == 5
    again = run_suite(defended(parts), x, y, ["eot-pgd"], cfg, seed=0)
    assert again["eot-pgd"]["tally"] == results["eot-pgd"]["tally"]  # reproducible from the seed
    # a longer list resumes from a shorter one's results: kept as they were, and what runs after them is
    # what the whole list would have made (an attack's seed is its place in the list)
    work.clear()
    longer = run_suite(defended(parts), x, y, ["eot-pgd", "bpda"], cfg, seed=0, earlier=again, on_batch=work.append)
    assert longer["eot-pgd"] is again["eot-pgd"] and list(longer) == ["clean", "eot-pgd", "bpda"]
    assert sum(work) == 8 * (attack_cost("eot-pgd", cfg) + attack_cost("bpda", cfg))  # the bar counts both
    whole = run_suite(defended(parts), x, y, ["eot-pgd", "bpda"], cfg, seed=0)
    assert longer["bpda"]["outcomes"] == whole["bpda"]["outcomes"]


def test_parse_attacks():
    assert parse_attacks("adaptive") == ["eot-pgd", "apgd", "bpda", "detector-aware", "orthogonal", "square"]
    assert parse_attacks("square, pgd") == ["pgd", "square"]
    assert parse_attacks("all") == list(SUITE)
    with pytest.raises(ValueError, match="unknown attack"):
        parse_attacks("cw")
    # a gradient attack may name its loss; each name once, attack.loss's entry first
    assert parse_attacks("square,eot-pgd:margin, eot-pgd,eot-pgd:margin") == ["eot-pgd", "eot-pgd:margin", "square"]
    for bad in ("eot-pgd:dlr", "square:ce", "cw:margin"):
        with pytest.raises(ValueError, match="unknown attack"):
            parse_attacks(bad)


def test_an_attack_may_name_its_own_budget():
    assert parse_attack_name("eot-pgd:margin@200x20") == ("eot-pgd", "margin", (200, 20))
    assert parse_attack_name("bpda@5X2") == ("bpda", None, (5, 2)) and parse_attack_name("square")[2] is None
    for bad in ("eot-pgd@200", "eot-pgd@0x4", "eot-pgd@x", "eot-pgd@2x-1", "square@10x2", "pgd@5x1", 3):
        assert not valid_attack_name(bad), bad
    assert parse_attacks("eot-pgd@200x20,eot-pgd,square") == ["eot-pgd", "eot-pgd@200x20", "square"]
    cfg = AttackConfig(adaptive_steps=50, eot=4)
    attack = build_attack("eot-pgd:margin@7x3", nn.Linear(2, 2), cfg, 0)
    assert (attack.steps, attack.loss) == (7, "margin") and cfg.adaptive_steps == 50
    with pytest.raises(ValueError, match="unknown attack"):
        build_attack("eot-pgd@0x1", nn.Linear(2, 2), cfg, 0)


def test_fixed_noise_is_the_same_draw_for_attacker_and_defender(parts):
    model = defended(parts, votes=2)
    x, y = parts["x"][:6], parts["y"][:6]
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # fresh noise on every call
        with fixed_noise(model, 5):
            once = model(x)
            assert torch.equal(once, model(x))
            assert all(torch.equal(once, z) for z in model.sample_logits(x, 3))  # what an attack's draws see
            assert torch.equal(model.unflagged_logits(x, 1), model.unflagged_logits(x, 1))
        with fixed_noise(model, 6):
            assert not torch.equal(once, model(x))  # another seed, another draw
    assert model.noise_seed is None
    cfg = AttackConfig(eps=0.03, alpha=0.01, adaptive_steps=3, eot=4, draws=4)
    results = run_suite(model, x, y, ["eot-pgd", "fixed-noise"], cfg, seed=0, batch=4)
    fixed = results["fixed-noise"]
    assert fixed["draws"] == 1 and fixed["settings"]["eot"] == 1 and fixed["linf"] <= 0.03 + 1e-6
    assert fixed["tally"].first == fixed["tally"].worst  # one answer per scan
    # the defender's answer is the draw the attacker optimized against: rerunning it under that noise agrees
    attack = build_attack("fixed-noise", model, cfg, 1_000 * 2)
    for start in (0, 4):
        xb, yb = x[start:start + 4], y[start:start + 4]
        with fixed_noise(model, (1_000 * 2 + 1) * 1_000_003 + start):
            adv = attack(xb, yb)
            seen = model(adv).argmax(1) == yb
        assert fixed["outcomes"]["first"][start:start + 4] == "".join("1" if v else "0" for v in seen)
    # on an undefended model it is eot-pgd itself, not run twice
    bare = run_suite(parts["classifier"], x, y, ["eot-pgd", "fixed-noise"], cfg, seed=0)
    assert bare["fixed-noise"]["same_as"] == "eot-pgd"
    # selective mode: a scan's noise does not depend on which other scans are flagged (purified)
    selective = defended(parts, mode="selective")
    depths = torch.full((6,), 40)
    with torch.no_grad(), fixed_noise(selective, 9):
        selective._fresh_call()
        every = selective.purify(x, depths)
        selective._fresh_call()
        some = selective.purify(x, torch.where(torch.arange(6) == 2, 0, depths))
    assert torch.equal(some[2], x[2])  # the same noise; the U-Net on 5 scans, not 6: float rounding only
    assert torch.allclose(some[[0, 1, 3, 4, 5]], every[[0, 1, 3, 4, 5]], atol=1e-5)


def test_a_named_loss_overrides_the_configured_one_for_that_attack_alone(parts):
    cfg = AttackConfig(eps=0.03, alpha=0.01, adaptive_steps=2, eot=2, loss="ce")
    model = defended(parts)
    assert build_attack("eot-pgd:margin", model, cfg, 0).describe()["loss"] == "margin"
    assert build_attack("orthogonal:margin", model, cfg, 0).loss == "margin"
    assert build_attack("eot-pgd", model, cfg, 0).describe()["loss"] == "ce" and cfg.loss == "ce"
    # on an undefended model bpda:margin repeats eot-pgd:margin, not the CE run
    x, y = parts["x"][:6], parts["y"][:6]
    results = run_suite(parts["classifier"], x, y, ["eot-pgd", "eot-pgd:margin", "bpda:margin", "orthogonal:ce"],
                        cfg, seed=0)
    assert results["bpda:margin"]["same_as"] == "eot-pgd:margin"
    assert results["orthogonal:ce"]["same_as"] == "eot-pgd"
    assert results["eot-pgd:margin"]["settings"]["loss"] == "margin" and "same_as" not in results["eot-pgd:margin"]


# --------------------------------------------------------------------------- exact savings
def _full_eot_objective(model, x, y, draws):
    """The reference computation: the detector run with its autograd graph on every draw."""
    losses = []
    for _ in range(draws):
        scores = model.detector(x)
        _, _, t_star = model.decide(x, scores)
        logits = model.classify([model.purify(x, t_star) for _ in range(model.defense.votes)])
        losses.append(attack_loss(logits, y))
    return torch.stack(losses).mean(dim=0)


@pytest.mark.parametrize("mode", ["graded", "selective"])
def test_eot_gradient_with_one_graphless_detector_pass_equals_the_full_computation(parts, mode):
    model = defended(parts, mode=mode)
    x, y = parts["x"][:12], parts["y"][:12]
    attack = PGD(model, eps=0.03, alpha=0.01, steps=1, eot=3)
    model.generator.manual_seed(7)
    value, grad = attack.value_and_gradient(x, y)
    model.generator.manual_seed(7)
    xr = x.clone().requires_grad_(True)
    expected = _full_eot_objective(model, xr, y, 3)
    expected_grad, = torch.autograd.grad(expected.sum(), xr)
    assert grad.abs().sum() > 0
    assert torch.equal(value, expected.detach()) and torch.equal(grad, expected_grad)
    # one draw goes through forward(): same gradient as the full computation (the selective mode's
    # unpurified scans take the detector's logits, computed on a different batch: float rounding)
    model.generator.manual_seed(9)
    _, grad1 = PGD(model, eps=0.03, alpha=0.01, steps=1).value_and_gradient(x, y)
    model.generator.manual_seed(9)
    xr = x.clone().requires_grad_(True)
    expected1, = torch.autograd.grad(_full_eot_objective(model, xr, y, 1).sum(), xr)
    assert torch.allclose(grad1, expected1, atol=1e-6, rtol=1e-4)


def test_decisions_build_no_autograd_graph_in_graded_mode(parts):
    model = defended(parts, mode="graded")
    x = parts["x"][:4].clone().requires_grad_(True)
    scores, _, _ = model.decide(x)
    out = model.details(x)
    assert not scores.requires_grad and not out.scores.requires_grad and out.logits.requires_grad
    # selective mode keeps the graph of the detector's logits: an unflagged scan's answer is them
    quiet = defended(parts, mode="selective")
    quiet.tau = float("inf")
    assert quiet.details(x).logits.requires_grad


# --------------------------------------------------------------------------- single-step training attacks
def test_single_step_attacks_stay_in_their_budgets_hurt_and_take_one_gradient(parts):
    from medfedpure.attacks import FGSMRS, NFGSM

    x, y, model = parts["x"], parts["y"], parts["classifier"]
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        rs = FGSMRS(model, eps=0.06, seed=1)(x, y)
        assert len(calls) == 1
        nf = NFGSM(model, eps=0.06, seed=1)(x, y)
        assert len(calls) == 2
    finally:
        hook.remove()
    assert (rs - x).abs().max() <= 0.06 + 1e-6 and rs.min() >= 0 and rs.max() <= 1
    # N-FGSM: noise 2 eps, a step of eps, no projection: up to 3 eps, and past eps somewhere
    assert (nf - x).abs().max() <= 0.18 + 1e-6 and (nf - x).abs().max() > 0.06 and nf.min() >= 0 and nf.max() <= 1
    assert torch.equal(nf, NFGSM(model, eps=0.06, seed=1)(x, y))  # seeded: reproducible
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean()
        for adv in (rs, nf):
            assert (model(adv).argmax(1) == y).float().mean() < clean
    assert torch.equal(NFGSM(model, eps=0.0, seed=1)(x, y), x)
    with pytest.raises(ValueError, match="noise"):
        NFGSM(model, eps=0.06, noise=-1.0)


def test_training_attack_follows_the_config():
    from medfedpure.attacks import FGSMRS, NFGSM, make_training_attack, training_attack_label
    from medfedpure.config import ConfigError

    cfg = load_preset("br35h-cpu")
    cfg.data.root = "data/br35h"  # validation only names it
    cfg.defense.adv_attack = None  # the defense's own (defense.adv_attack) is tested with the defense
    assert type(make_training_attack(None, cfg, 0)) is PGD and make_training_attack(None, cfg, 0).steps == 7
    cfg.method.adv_attack = "n-fgsm"
    a = make_training_attack(None, cfg, 0)
    assert isinstance(a, NFGSM) and (a.eps, a.alpha, a.noise) == (0.015, 0.015, 0.03)
    assert training_attack_label(cfg) == "N-FGSM linf eps=0.015 alpha=0.015 noise=0.03"
    cfg.method.adv_attack, cfg.method.adv_eps, cfg.method.adv_alpha = "fgsm-rs", 0.02, 0.01
    a = make_training_attack(None, cfg, 0)
    assert isinstance(a, FGSMRS) and (a.eps, a.alpha) == (0.02, 0.01)
    cfg.method.adv_norm = "l2"
    with pytest.raises(ConfigError, match="method.adv_attack"):
        cfg.validate()
    cfg.method.adv_norm, cfg.method.adv_attack = None, "fgsm"
    with pytest.raises(ConfigError, match="method.adv_attack"):
        cfg.validate()


def test_a_moved_run_keeps_its_own_suite_evaluations_but_a_study_folder_does_not_follow_it(tmp_path):
    """A run folder copied or moved elsewhere: its own evaluations (inside it) are still done, so a
    rerun of `experiment` redoes nothing; an evaluation kept outside (a study's) names the run it attacked."""
    import shutil

    from medfedpure.evaluation.attack_suite import suite_done, suite_request
    from medfedpure.storage import write_json

    run, study = tmp_path / "run", tmp_path / "study" / "as-trained"
    for folder in (run / "evaluations" / "own-test-suite", study):
        folder.mkdir(parents=True)
        write_json(folder / "request.json", suite_request(run, None, ["eot-pgd"], max_per_client=3))
        write_json(folder / "evaluation.json", {})
    assert suite_done(run / "evaluations" / "own-test-suite", suite_request(run, None, ["eot-pgd"], max_per_client=3))
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, moved)
    asked = suite_request(moved, None, ["eot-pgd"], max_per_client=3)
    assert suite_done(moved / "evaluations" / "own-test-suite", asked)
    assert not suite_done(moved / "evaluations" / "own-test-suite", {**asked, "max_per_client": 4})  # asked otherwise
    assert not suite_done(study, asked)  # the study's evaluation is of the run at its old place
