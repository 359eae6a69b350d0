"""The README's benchmark table, made from the benchmarks' own JSON, never typed by hand.

    python benchmarks/readme.py [--check] [--readme README.md] [--results benchmarks/results.json]
                                [--load benchmarks/load.json]

Writes the table between the README's `benchmarks` markers; `--check` only compares and exits 1
when the README's table is not what the JSON gives (the test suite runs it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medfedpure.reporting.markdown import read_block, replace_block, table
from medfedpure.storage import atomic_write_text, read_json

HEADER = ["what", "measured", "against", "when"]


def _when(results: dict, key: str) -> str:
    stamp = results.get("measured", {}).get(key, "")
    return stamp[:10] if stamp[:4].isdigit() else "undated"


def rows(results: dict, load: dict | None) -> list[list]:
    out = []
    shipped = results.get("shipped_default", {})
    for layout, what in (("default", "the shipped defense, a clean scan, default layout"),
                         ("channels_last", "the same in channels-last layout (`predict`, `serve`)"),
                         ("channels_last_compiled", "the same with `torch.compile` too")):
        if layout in shipped:
            r = shipped[layout]
            out.append([what, f"{r['clean']['ms_per_scan']} ms (bare classifier {r['bare_ms_per_scan']})",
                        f"{r['clean']['over_bare']}x the bare classifier", _when(results, "shipped_default")])
    if "channels_last" in shipped:
        r = shipped["channels_last"]["flagged"]
        out.append(["a flagged scan, channels-last", f"{r['ms_per_scan']} ms", f"{r['over_bare']}x",
                    _when(results, "shipped_default")])
    grad = results.get("defended_gradient")
    if grad:
        old, new = grad["default"], grad["channels_last"]
        out.append([f"one gradient through the defense: `.backward()` / as an attack takes it, channels-last / "
                    f"per draw of an EOT-4 step (batch {grad['batch']})",
                    f"{old['defended_gradient_ms_per_scan']} / {new['attack_gradient_ms_per_scan']} / "
                    f"{new['eot4_step_ms_per_scan_and_draw']} ms a scan",
                    f"{new['attack_gradient_ms_per_scan'] / old['defended_gradient_ms_per_scan']:.2f}x and "
                    f"{new['eot4_step_ms_per_scan_and_draw'] / old['defended_gradient_ms_per_scan']:.2f}x "
                    "the first (goal: a third)", _when(results, "defended_gradient")])
    projected = results.get("experiment_breakdown", {}).get("projected", {})
    pgd, fgsm = (projected.get(f"adv_{a}, PGD evaluation final round only") for a in ("pgd", "n-fgsm"))
    if pgd and fgsm:
        breakdown = results["experiment_breakdown"]
        phase4 = (f", then phase 4 ({breakdown['phase_purifier']['runs']}, {breakdown['phase_purifier']['attack']})"
                  if "phase_purifier" in breakdown else " (measured without phase 4)")
        shipped = breakdown.get("shipped_attack")  # the defense's training attack in the preset measured
        out.append([f"`{results['preset']}` experiment projected by stage: adversarial training through the purifier "
                    f"with PGD-7{' (shipped)' if shipped == 'pgd' else ''} / one N-FGSM step"
                    f"{' (shipped)' if shipped == 'n-fgsm' else ''}{phase4}, PGD test after the last round",
                    f"{pgd['experiment_s']:.0f} s / {fgsm['experiment_s']:.0f} s", "goal 1800 s",
                    _when(results, "experiment_breakdown")])
    flower = results.get("flower_overhead_br35h_cpu", {})
    if "ratio" in flower:
        out.append([f"Flower simulation against the plain loop, the same work ({flower['work']})",
                    f"{flower['flower_simulation_s']} s against {flower['direct_s']} s", f"{flower['ratio']}x",
                    _when(results, "flower_overhead_br35h_cpu")])
    deploy = results.get("deployment", {})
    if "ratio" in deploy:
        out.append([f"Flower deployment runtime (TLS, node authentication) against the simulation ({deploy['work']})",
                    f"{deploy['deployment_s']} s against {deploy['simulation_s']} s", f"{deploy['ratio']}x",
                    _when(results, "deployment")])
    if "training" in results:
        t = results["training"]
        out.append([f"local training, {t['model']}, batch {t['batch']}", f"{t['images_per_s']} images/s", None,
                    _when(results, "training")])
    if load:
        out.append([f"serving (`benchmarks/load.py`, {load['requests']} requests from {load['concurrency']} threads"
                    + (f", every {load['hostile_every']}th a decompression or voxel bomb" if load.get("hostile_every")
                       else "") + ")",
                    f"{load['requests_per_s']} scans/s, p50 {load['latency_ms']['p50'] / 1000:.2f} s, "
                    f"{load['errors']} errors", f"peak RSS {load['service_rss_mb']['peak']:.0f} MB",
                    load.get("measured", "undated")[:10]])
    return out


def render(results: dict, load: dict | None) -> str:
    return table(HEADER, rows(results, load))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results.json"))
    parser.add_argument("--load", type=Path, default=Path("benchmarks/load.json"))
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when the README differs")
    args = parser.parse_args(argv)
    block = render(read_json(args.results), read_json(args.load) if args.load.is_file() else None)
    text = args.readme.read_text()
    if args.check:
        if read_block(text, "benchmarks") != block:
            print(f"{args.readme}: the benchmark table is not what {args.results} gives; run "
                  "`python benchmarks/readme.py`", file=sys.stderr)
            return 1
        return 0
    try:
        atomic_write_text(args.readme, replace_block(text, "benchmarks", block))
    except ValueError as err:
        parser.error(f"{args.readme}: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
