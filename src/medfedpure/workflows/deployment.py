"""The ServerApp for Flower's deployment runtime: `flwr run . <connection>` (or `medfedpure
deploy-local`) starts it on the SuperLink's machine; each hospital runs the project's ClientApp
(`medfedpure.federation.client_app:app`) on its own SuperNode, with its own scans.

It runs the same phases as `medfedpure experiment` runs for MedFedPure (the diffusion U-Net and
the MAE when the defense is on, then the experts and the defended evaluation), with the same
ServerApp code as the simulation, into the run folder named by the run config's `out-dir`, and
ends with the report. The server holds no scans: the config names the federation's classes
(Br35H's are known), and `data.layout` is `hospital` (each SuperNode's `data-dir`) unless the
config says otherwise.

Run config (`[tool.flwr.app.config]` in pyproject.toml, or `flwr run --run-config`):
  preset            a built-in preset or a YAML file
  overrides         `section.field=value` items separated by `;`
  experiment-json   the whole config as JSON (wins over preset and overrides; deploy-local uses it)
  out-dir           the run folder on the server's machine
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medfedpure.config import ExperimentConfig, apply_overrides, load_preset
from medfedpure.methods import method_of, task
from medfedpure.workflows.experiment import phase_done, phases_of, run_phase
from medfedpure.workflows.report import write_report

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, out = config_from_run(dict(context.run_config))
    run_deployment(cfg, out, grid, context)


def config_from_run(run_config: dict) -> tuple[ExperimentConfig, Path]:
    """The experiment config and run folder a deployment's run config names."""
    text = str(run_config.get("experiment-json", "") or "")
    if text:
        cfg = ExperimentConfig.from_json(text)
    else:
        overrides = [item.strip() for item in str(run_config.get("overrides", "")).split(";") if item.strip()]
        cfg = apply_overrides(load_preset(str(run_config.get("preset", "demo"))), overrides)
    if cfg.data.layout == "pooled":  # on a deployment every hospital reads its own folder (its data-dir)
        cfg.data.layout = "hospital"
    if not cfg.data.classes and task.federation_classes(cfg):
        cfg.data.classes = list(task.federation_classes(cfg))
    out = str(run_config.get("out-dir", "") or "")
    if not out:
        raise ValueError("run config 'out-dir' is empty: name the run folder on the server's machine")
    return cfg.validate(), Path(out).expanduser().resolve()


def run_deployment(cfg: ExperimentConfig, out: Path, grid: Grid, context: Context) -> dict:
    """Every phase MedFedPure needs that `out` does not hold yet, on the deployment's grid."""
    method = method_of(cfg)
    mcfg = method.configure(cfg)
    for phase in phases_of(method, mcfg):
        if phase_done(mcfg, out, phase):
            log.info("phase %s: already done in %s, not redone", phase, out)
        else:
            run_phase(mcfg, phase, out, progress=False, deployment=(grid, context))
    return write_report(out)
