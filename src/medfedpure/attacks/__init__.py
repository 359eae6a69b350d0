"""Attacks: every one is an object called as `attack(images, labels)`.

The suite (`build_attack`) names what `medfedpure evaluate --attack` runs against a model,
bare or defended (a `DefendedClassifier`):

- `pgd`: PGD crafted on the classifier alone, then met by the defense (the paper's protocol);
- `eot-pgd`: PGD with exact gradients through the whole defended classifier, the loss averaged
  over `eot` fresh purification draws per step, each scan keeping its best iterate;
- `fixed-noise`: the same with the purification noise fixed, one draw known to the attacker and
  reused by the defender's answer (the fixed-randomness setting, Liu et al., ICLR 2025): not a
  threat a defense that draws fresh noise faces, so reported beside the headline, not in it;
- `bpda`: the same with purification treated as the identity on the backward pass;
- `detector-aware`: EOT-PGD plus a term that keeps the detector's score under its threshold;
- `orthogonal`: orthogonal PGD (Bryniarski et al., 2022): steps that fool the answer an unflagged
  scan gets and steps that lower the score take turns, each orthogonal to the other's gradient;
- `square`: gradient-free random search (l_inf), the check for masked gradients.
Adversarial training crafts its examples with `make_training_attack`: PGD-k, or a single-step
attack (`fgsm-rs`, `n-fgsm`, attacks.fgsm) at about 1/k of its cost (`method.adv_attack`).
On an undefended model the first six are all white-box PGD. A gradient attack's name may carry
the loss it maximizes, `eot-pgd:margin`, overriding `attack.loss` for that entry, and an attack
that knows the defense its budget, `eot-pgd:margin@200x20` (steps x EOT draws), overriding
`attack.adaptive_steps` and `attack.eot` (the convergence check of a headline).
"""

from dataclasses import replace

from medfedpure.attacks.base import Attack, attack_loss
from medfedpure.attacks.bpda import BPDA
from medfedpure.attacks.detector_aware import DetectorAwarePGD
from medfedpure.attacks.fgsm import FGSMRS, NFGSM
from medfedpure.attacks.orthogonal import OrthogonalPGD
from medfedpure.attacks.pgd import PGD
from medfedpure.attacks.square import Square
from medfedpure.config import SUITE_NAMES, parse_attack_name, split_attack_name, valid_attack_name

SUITE = SUITE_NAMES
ADAPTIVE = ("eot-pgd", "bpda", "detector-aware", "orthogonal", "square")  # the attacks that know the defense
# (fixed-noise knows it too, and its noise: a diagnostic, not in the headline)


def parse_attacks(text: str) -> list[str]:
    """'all', 'adaptive' or a comma-separated list of suite names (each gradient attack optionally
    with its loss, `eot-pgd:margin`), in the suite's order, attack.loss's entry before the others."""
    text = text.strip()
    names = list(SUITE) if text == "all" else list(ADAPTIVE) if text == "adaptive" else \
        [t.strip().replace(" ", "") for t in text.split(",") if t.strip()]
    unknown = [n for n in names if not valid_attack_name(n)]
    if unknown or not names:
        raise ValueError(f"unknown attack(s) {unknown or [text]}; choose from {', '.join(SUITE)}, 'adaptive' or "
                         "'all' (a gradient attack may name its loss and budget: eot-pgd:margin@200x20)")
    unique = list(dict.fromkeys(names))
    return sorted(unique, key=lambda n: (SUITE.index(base_attack(n)), split_attack_name(n)[1] or "",
                                         parse_attack_name(n)[2] or (0, 0)))


def base_attack(name: str) -> str:
    """The suite attack a name runs: 'eot-pgd:margin' -> 'eot-pgd'."""
    return split_attack_name(name)[0]


def make_pgd(model, cfg, seed: int, loss: str = "ce") -> PGD:
    """PGD with the budget of `cfg` (an AttackConfig: norm, eps, alpha, steps, random start): the
    paper's evaluation attack, and adversarial training's with its own budget."""
    return PGD(model, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps, norm=cfg.norm, random_start=cfg.random_start,
               seed=seed, loss=loss)


def make_training_attack(model, cfg, seed: int) -> PGD:
    """The attack adversarial training crafts its examples with (`cfg` an ExperimentConfig):
    `method.adv_attack` (pgd, fgsm-rs, n-fgsm) with the budget of `cfg.adversarial_training_attack()`
    (method.adv_* where set, else attack.*). The single-step attacks take their own step (FGSM-RS:
    1.25 eps, N-FGSM: eps) and N-FGSM its noise (2 eps) unless method.adv_alpha / adv_noise set them."""
    m, budget = cfg.method, cfg.adversarial_training_attack()
    if m.adv_attack == "pgd":
        return make_pgd(model, budget, seed)
    if budget.norm != "linf":
        raise ValueError(f"method.adv_attack={m.adv_attack} is l_inf only (method.adv_norm / attack.norm=linf)")
    if m.adv_attack == "fgsm-rs":
        return FGSMRS(model, eps=budget.eps, alpha=m.adv_alpha, seed=seed)
    if m.adv_attack == "n-fgsm":
        return NFGSM(model, eps=budget.eps, alpha=m.adv_alpha, noise=m.adv_noise, seed=seed)
    raise ValueError(f"method.adv_attack must be pgd, fgsm-rs or n-fgsm, not '{m.adv_attack}'")


def training_attack_label(cfg) -> str:
    """How tables name adversarial training's attack (`cfg` an ExperimentConfig)."""
    return make_training_attack(None, cfg, 0).label


def pgd_label(cfg) -> str:
    """How tables and figures name the PGD of `cfg` (an AttackConfig)."""
    return PGD.label_for(cfg.norm, cfg.eps, cfg.alpha, cfg.steps)


def build_attack(name: str, model, cfg, seed: int) -> Attack:
    """Suite attack `name` against `model` with the budget of `cfg` (an AttackConfig); a name with a
    loss (`eot-pgd:margin`) uses that loss instead of `cfg.loss`, one with a budget
    (`eot-pgd@200x20`) those steps and EOT draws instead of `cfg.adaptive_steps` and `cfg.eot`."""
    if not valid_attack_name(name):
        raise ValueError(f"unknown attack '{name}'; choose from {', '.join(SUITE)} (a gradient attack may name its "
                         "loss and budget: eot-pgd:margin@200x20)")
    name, loss, budget = parse_attack_name(name)
    if loss is not None:
        cfg = replace(cfg, loss=loss)
    if budget is not None:
        cfg = replace(cfg, adaptive_steps=budget[0], eot=budget[1])
    defended = hasattr(model, "purify_draws")
    eot = cfg.eot if getattr(model, "stochastic", False) else 1  # a deterministic model needs one pass
    common = {"eps": cfg.eps, "alpha": cfg.alpha, "norm": cfg.norm, "random_start": cfg.random_start,
              "seed": seed, "loss": cfg.loss}
    if name == "pgd":
        return make_pgd(model.classifier if defended else model, cfg, seed, loss=cfg.loss)
    adaptive = {"steps": cfg.adaptive_steps, "eot": eot, "keep_best": True, **common}
    if name == "eot-pgd":
        return _named(PGD(model, **adaptive), "eot-pgd")
    if name == "fixed-noise":  # one draw: the noise is the same on every call (evaluation.robustness.fixed_noise)
        return _named(PGD(model, **{**adaptive, "eot": 1}), "fixed-noise")
    if name == "bpda":
        return BPDA(model, **adaptive)
    if name == "detector-aware":
        return DetectorAwarePGD(model, weight=cfg.detector_weight, **adaptive)
    if name == "orthogonal":
        return OrthogonalPGD(model, **adaptive)
    if name == "square":
        if cfg.norm != "linf":
            raise ValueError("the Square attack here is l_inf only (attack.norm=linf)")
        return Square(model, eps=cfg.eps, n_queries=cfg.square_queries, seed=seed)
    raise ValueError(f"unknown attack '{name}'; choose from {', '.join(SUITE)}")


def _named(attack: Attack, name: str) -> Attack:
    attack.name = name
    return attack


__all__ = ["ADAPTIVE", "Attack", "BPDA", "DetectorAwarePGD", "FGSMRS", "NFGSM", "OrthogonalPGD", "PGD", "SUITE", "Square",
           "attack_loss", "base_attack", "build_attack", "make_pgd", "make_training_attack", "parse_attacks",
           "pgd_label", "training_attack_label"]
