"""Reporting: result rows, run metadata and figures."""

from medfedpure.reporting.plots import plot_convergence
from medfedpure.reporting.results import environment_info, mean_rows, round_rows

__all__ = ["environment_info", "mean_rows", "plot_convergence", "round_rows"]
