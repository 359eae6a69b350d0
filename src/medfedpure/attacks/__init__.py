"""Attacks: every one is an object called as `attack(images, labels)`."""

from medfedpure.attacks.pgd import PGD, Attack

__all__ = ["Attack", "PGD"]
