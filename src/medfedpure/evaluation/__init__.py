"""Evaluation of trained runs: open a run's clients (runs), score a stochastic defense
(robustness), the attack suite on a run (attack_suite), internal evasion (transfer)."""
