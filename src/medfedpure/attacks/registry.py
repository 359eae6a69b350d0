"""The one home of every attack's name and facts (docs/design.md, Evaluation protocols).

Each suite attack is registered once, with what builds it, what it knows of the defense, whether it
takes a loss (`eot-pgd:margin`) and a budget (`eot-pgd@200x20`: steps x EOT draws), whether it is
exactly white-box PGD on a model without a defense, what one scan costs, and the line the CLI
prints for it. Config validation, the suite's table, the CLI's help and the attack builder all read
this table; so do adversarial training's attacks (`TRAINING_ATTACKS`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from torch import nn

from medfedpure.attacks.apgd import APGD
from medfedpure.attacks.base import LOSSES, Attack, Defended, is_stochastic
from medfedpure.attacks.bpda import BPDA
from medfedpure.attacks.detector_aware import DetectorAwarePGD
from medfedpure.attacks.fgsm import FGSMRS, NFGSM
from medfedpure.attacks.orthogonal import OrthogonalPGD
from medfedpure.attacks.pgd import PGD
from medfedpure.attacks.square import Square, SquareL2


@dataclass(frozen=True)
class SuiteAttack:
    """One attack of the suite (`medfedpure evaluate --attack NAME`)."""

    name: str
    build: Callable  # (model, cfg, seed) -> Attack; cfg an AttackConfig with the entry's loss and budget applied
    knows: str  # what it knows of the defense, as the suite's table says it
    help: str  # the CLI's words for it
    adaptive: bool = True  # knows the defense: in 'adaptive', and a candidate for the headline
    takes_loss: bool = True  # a gradient attack: 'NAME:margin' picks its loss
    budgeted: bool = True  # takes '@STEPSxDRAWS' (attack.adaptive_steps x attack.eot otherwise)
    one_draw: bool = False  # its budget has one EOT draw (the noise is fixed)
    same_as_pgd_without_defense: bool = False  # on a bare model it is exactly eot-pgd
    # model calls per scan where the budget is not adaptive steps x EOT draws: (AttackConfig) -> int
    calls: Callable | None = None

    def cost(self, cfg, budget: tuple[int, int] | None = None) -> int:
        """Model calls (forward and backward) one scan costs with the budget of `cfg` (an AttackConfig)."""
        if self.calls is not None:
            return max(1, self.calls(cfg))
        steps, eot = budget or (cfg.adaptive_steps, cfg.eot)
        return max(1, steps * (1 if self.one_draw else eot))


ATTACKS: dict[str, SuiteAttack] = {}

@dataclass(frozen=True)
class TrainingAttack:
    """An attack adversarial training crafts its examples with (`method.adv_attack`)."""

    name: str
    build: Callable  # (model, budget: an AttackConfig, method: a MethodConfig, seed) -> Attack
    linf_only: bool  # a single-step attack: l_inf budgets only


TRAINING_ATTACKS: dict[str, TrainingAttack] = {}


def register(name: str, knows: str, help: str, **facts) -> Callable:
    """Decorator: register `build(model, cfg, seed)` as suite attack `name` (once)."""
    def wrap(build: Callable) -> Callable:
        if name in ATTACKS:
            raise ValueError(f"attack '{name}' is registered twice")
        ATTACKS[name] = SuiteAttack(name, build, knows, help, **facts)
        return build
    return wrap


def _adaptive(model: nn.Module, cfg, seed: int) -> dict:
    """The settings every attack that knows the defense shares: its steps, EOT draws (one on a
    deterministic model), budget, loss, and each scan keeping its best iterate."""
    return {"steps": cfg.adaptive_steps, "eot": cfg.eot if is_stochastic(model) else 1, "keep_best": True,
            "eps": cfg.eps, "alpha": cfg.alpha, "norm": cfg.norm, "random_start": cfg.random_start,
            "seed": seed, "loss": cfg.loss}


def _named(attack: Attack, name: str) -> Attack:
    attack.name = name
    return attack


def make_pgd(model: nn.Module, cfg, seed: int, loss: str = "ce") -> PGD:
    """PGD with the budget of `cfg` (an AttackConfig: norm, eps, alpha, steps, random start): the
    paper's evaluation attack, and adversarial training's with its own budget."""
    return PGD(model, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps, norm=cfg.norm, random_start=cfg.random_start,
               seed=seed, loss=loss)


@register("pgd", knows="no (paper protocol)", adaptive=False, budgeted=False, calls=lambda cfg: cfg.steps,
          help="PGD on the classifier alone, then met by the defense (the paper's protocol)")
def _pgd(model, cfg, seed):
    return make_pgd(model.classifier if isinstance(model, Defended) else model, cfg, seed, loss=cfg.loss)


WHITE_BOX = "eot-pgd"  # what an attack that is `same_as_pgd_without_defense` equals on a bare model


@register(WHITE_BOX, knows="yes", help="PGD with exact gradients through the whole defense, averaged over EOT draws")
def _eot_pgd(model, cfg, seed):
    return _named(PGD(model, **_adaptive(model, cfg, seed)), WHITE_BOX)


@register("apgd", knows="yes",
          help="Auto-PGD (AutoAttack's): momentum, and a step size halved where a scan's progress stalls")
def _apgd(model, cfg, seed):
    settings = _adaptive(model, cfg, seed)
    return APGD(model, **{k: v for k, v in settings.items() if k not in ("alpha", "keep_best")})


@register("fixed-noise", knows="yes, and its noise (not in the headline)", adaptive=False, one_draw=True,
          same_as_pgd_without_defense=True,
          help="the purifier's noise fixed, attacker and defender alike (Liu et al., ICLR 2025)")
def _fixed_noise(model, cfg, seed):  # the noise is the same on every call (evaluation.robustness.fixed_noise)
    return _named(PGD(model, **{**_adaptive(model, cfg, seed), "eot": 1}), "fixed-noise")


@register("bpda", knows="yes", same_as_pgd_without_defense=True,
          help="the purifier taken as the identity on the backward pass")
def _bpda(model, cfg, seed):
    return BPDA(model, **_adaptive(model, cfg, seed))


@register("detector-aware", knows="yes", same_as_pgd_without_defense=True,
          help="EOT-PGD that also keeps the detector's score under its threshold")
def _detector_aware(model, cfg, seed):
    return DetectorAwarePGD(model, weight=cfg.detector_weight, **_adaptive(model, cfg, seed))


@register("orthogonal", knows="yes", same_as_pgd_without_defense=True,
          help="orthogonal PGD: fooling the answer and evading the detector take turns")
def _orthogonal(model, cfg, seed):
    return OrthogonalPGD(model, **_adaptive(model, cfg, seed))


@register("square", knows="yes (queries)", takes_loss=False, budgeted=False, calls=lambda cfg: cfg.square_queries,
          help="gradient-free random search (l_inf or l_2), the check for masked gradients")
def _square(model, cfg, seed):
    return (Square if cfg.norm == "linf" else SquareL2)(model, eps=cfg.eps, n_queries=cfg.square_queries, seed=seed)


SUITE = tuple(ATTACKS)  # the suite's order: 'all'
ADAPTIVE = tuple(n for n, a in ATTACKS.items() if a.adaptive)  # 'adaptive': the attacks that know the defense


def _training(name: str, linf_only: bool = True) -> Callable:
    def wrap(build: Callable) -> Callable:
        TRAINING_ATTACKS[name] = TrainingAttack(name, build, linf_only)
        return build
    return wrap


@_training("pgd", linf_only=False)
def _train_pgd(model, budget, method, seed):
    return make_pgd(model, budget, seed)


@_training("fgsm-rs")
def _train_fgsm_rs(model, budget, method, seed):
    return FGSMRS(model, eps=budget.eps, alpha=method.adv_alpha, seed=seed)


@_training("n-fgsm")
def _train_n_fgsm(model, budget, method, seed):
    return NFGSM(model, eps=budget.eps, alpha=method.adv_alpha, noise=method.adv_noise, seed=seed)


def parse_attack_name(name: str) -> tuple[str, str | None, tuple[int, int] | None]:
    """'eot-pgd:margin@200x20' -> ('eot-pgd', 'margin', (200, 20)): a suite entry may name the loss its
    gradient attack maximizes (overriding `attack.loss`) and its own budget, steps x EOT draws
    (overriding `attack.adaptive_steps` and `attack.eot`), for that entry alone. A budget that is not
    two positive integers parses as (0, 0), which `valid_attack_name` refuses."""
    head, at, budget = name.strip().partition("@")
    base, _, loss = head.partition(":")
    parsed = None
    if at:
        steps, x, draws = budget.strip().lower().partition("x")
        parsed = (int(steps), int(draws)) if x and steps.isdigit() and draws.isdigit() else (0, 0)
    return base.strip(), loss.strip() or None, parsed


def split_attack_name(name: str) -> tuple[str, str | None]:
    """'eot-pgd:margin' -> ('eot-pgd', 'margin'); 'eot-pgd' -> ('eot-pgd', None) (a budget is dropped)."""
    base, loss, _ = parse_attack_name(name)
    return base, loss


def base_attack(name: str) -> SuiteAttack:
    """The registered attack a suite entry runs: 'eot-pgd:margin@200x20' -> ATTACKS['eot-pgd']."""
    return ATTACKS[parse_attack_name(name)[0]]


def valid_attack_name(name: str) -> bool:
    """A suite name, with an optional ':ce' / ':margin' on a gradient attack and an optional
    '@STEPSxDRAWS' on an attack with a budget of steps and draws (one draw where its noise is fixed)."""
    if not isinstance(name, str):
        return False
    base, loss, budget = parse_attack_name(name)
    spec = ATTACKS.get(base)
    return (spec is not None and (loss is None or (loss in LOSSES and spec.takes_loss))
            and (budget is None or (spec.budgeted and min(budget) >= 1 and (not spec.one_draw or budget[1] == 1))))


NAME_HELP = "a gradient attack may name its loss and budget: eot-pgd:margin@200x20"


def unknown_attacks_message(names) -> str:
    return f"unknown attack(s) {list(names)}; choose from {', '.join(SUITE)}, 'adaptive' or 'all' ({NAME_HELP})"


def parse_attacks(text: str) -> list[str]:
    """'all', 'adaptive' or a comma-separated list of suite names (each gradient attack optionally
    with its loss, `eot-pgd:margin`), in the suite's order, attack.loss's entry before the others."""
    text = text.strip()
    names = list(SUITE) if text == "all" else list(ADAPTIVE) if text == "adaptive" else \
        [t.strip().replace(" ", "") for t in text.split(",") if t.strip()]
    unknown = [n for n in names if not valid_attack_name(n)]
    if unknown or not names:
        raise ValueError(unknown_attacks_message(unknown or [text]))
    unique = list(dict.fromkeys(names))
    return sorted(unique, key=lambda n: (SUITE.index(parse_attack_name(n)[0]), split_attack_name(n)[1] or "",
                                         parse_attack_name(n)[2] or (0, 0)))


def suite_help() -> str:
    """The CLI's help for `--attack`, from the registry."""
    listed = "; ".join(f"{a.name}: {a.help}" for a in ATTACKS.values())
    return (f"run the attack suite instead of the paper-protocol evaluation. {listed}. 'adaptive': "
            f"{', '.join(ADAPTIVE)}; 'all': every one. {NAME_HELP[0].upper() + NAME_HELP[1:]} (otherwise "
            "attack.loss, attack.adaptive_steps x attack.eot); other budgets from attack.square_queries and "
            "attack.draws")


def build_attack(name: str, model: nn.Module, cfg, seed: int) -> Attack:
    """Suite attack `name` against `model` with the budget of `cfg` (an AttackConfig); a name with a
    loss (`eot-pgd:margin`) uses that loss instead of `cfg.loss`, one with a budget
    (`eot-pgd@200x20`) those steps and EOT draws instead of `cfg.adaptive_steps` and `cfg.eot`."""
    if not valid_attack_name(name):
        raise ValueError(unknown_attacks_message([name]))
    base, loss, budget = parse_attack_name(name)
    if loss is not None:
        cfg = replace(cfg, loss=loss)
    if budget is not None:
        cfg = replace(cfg, adaptive_steps=budget[0], eot=budget[1])
    return ATTACKS[base].build(model, cfg, seed)


def make_training_attack(model: nn.Module | None, cfg, seed: int) -> Attack:
    """The attack adversarial training crafts its examples with (`cfg` an ExperimentConfig):
    `method.adv_attack` (pgd, fgsm-rs, n-fgsm) with the budget of `cfg.adversarial_training_attack()`
    (method.adv_* where set, else attack.*). The single-step attacks take their own step (FGSM-RS:
    1.25 eps, N-FGSM: eps) and N-FGSM its noise (2 eps) unless method.adv_alpha / adv_noise set them."""
    m, budget = cfg.method, cfg.adversarial_training_attack()
    if m.adv_attack not in TRAINING_ATTACKS:
        raise ValueError(f"method.adv_attack must be one of {', '.join(TRAINING_ATTACKS)}, not '{m.adv_attack}'")
    attack = TRAINING_ATTACKS[m.adv_attack]
    if attack.linf_only and budget.norm != "linf":
        raise ValueError(f"method.adv_attack={m.adv_attack} is l_inf only (method.adv_norm / attack.norm=linf)")
    return attack.build(model, budget, m, seed)
