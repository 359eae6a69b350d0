"""Attacks: every one is an object called as `attack(images, labels)`.

The suite (`build_attack`; every name and fact in one registry, attacks.registry) names what
`medfedpure evaluate --attack` runs against a model,
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

from medfedpure.attacks.apgd import APGD
from medfedpure.attacks.base import Attack, attack_loss
from medfedpure.attacks.bpda import BPDA
from medfedpure.attacks.detector_aware import DetectorAwarePGD
from medfedpure.attacks.fgsm import FGSMRS, NFGSM
from medfedpure.attacks.orthogonal import OrthogonalPGD
from medfedpure.attacks.pgd import PGD
from medfedpure.attacks.registry import (ADAPTIVE, ATTACKS, SUITE, TRAINING_ATTACKS, WHITE_BOX, Defended, base_attack,
                                         build_attack, is_stochastic, make_pgd, make_training_attack,
                                         parse_attack_name, parse_attacks, split_attack_name, valid_attack_name)
from medfedpure.attacks.square import Square


def training_attack_label(cfg) -> str:
    """How tables name adversarial training's attack (`cfg` an ExperimentConfig)."""
    return make_training_attack(None, cfg, 0).label


def pgd_label(cfg) -> str:
    """How tables and figures name the PGD of `cfg` (an AttackConfig)."""
    return PGD.label_for(cfg.norm, cfg.eps, cfg.alpha, cfg.steps)


__all__ = ["ADAPTIVE", "APGD", "ATTACKS", "Attack", "BPDA", "Defended", "DetectorAwarePGD", "FGSMRS", "NFGSM", "OrthogonalPGD",
           "PGD", "SUITE", "Square", "TRAINING_ATTACKS", "WHITE_BOX", "attack_loss", "base_attack", "build_attack",
           "is_stochastic",
           "make_pgd", "make_training_attack", "parse_attack_name", "parse_attacks", "pgd_label",
           "split_attack_name", "training_attack_label", "valid_attack_name"]
