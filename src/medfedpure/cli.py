"""medfedpure: federated personalized MoE brain-MRI classification with client-side MAE
detection and diffusion purification. Phases share one run folder: pretrain-diffusion (1),
pretrain-mae (2), train (3, then the defended evaluation)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from medfedpure.attacks.registry import suite_help
from medfedpure.config import METHOD_NAMES, ConfigError, apply_overrides, load_preset, preset_names
from medfedpure.data import DataError


def _config(args: argparse.Namespace):
    cfg = apply_overrides(load_preset(args.preset), args.overrides)
    if args.data:
        if cfg.data.dataset == "synthetic":
            raise ConfigError(f"preset '{args.preset}' trains on the built-in synthetic scans (data.dataset="
                              f"synthetic), so --data '{args.data}' would be ignored: add data.dataset=folder "
                              "(one sub-folder per class), br35h or cifar10, or use a preset for real data")
        cfg.data.root = args.data
    if args.seed is not None:
        cfg.seed = args.seed
    if getattr(args, "method", None):
        cfg.method.name = args.method
    return cfg.validate()


def _out(args: argparse.Namespace, cfg) -> Path:
    return Path(args.out or f"runs/{cfg.name}")


def _run_options(args: argparse.Namespace) -> dict:
    return {"progress": not args.no_progress,
            "flower_log_level": logging.INFO if args.verbose else logging.ERROR}


def _train(args: argparse.Namespace) -> int:
    from medfedpure.attacks import pgd_label
    from medfedpure.workflows.training import failures, run_federated

    cfg = _config(args)
    out = _out(args, cfg)
    print(f"medfedpure train: preset {args.preset}, method {cfg.method.name} -> {out}", flush=True)
    result = run_federated(cfg, out, **_run_options(args))
    f = result.final
    print(f"\nfinished in {result.wall_time_s / 60:.1f} min; round {f['round']} weighted mean over "
          f"{cfg.data.num_clients} clients: clean acc {100 * f['clean_acc']:.2f}%"
          + (f", {pgd_label(cfg.attack)} acc {100 * f['adv_acc']:.2f}%" if f.get("adv_acc") is not None else ""))
    for row in result.defense:
        print(f"  defended ({row['mode']}, {row['detector']} detector, {row['rule']} rule): "
              f"clean {100 * row['clean_acc']:.2f}% (bare {100 * row['bare_clean_acc']:.2f}%), "
              f"PGD {100 * row['adv_acc']:.2f}% (bare {100 * row['bare_adv_acc']:.2f}%), AUROC {row['auroc']:.3f}")
    _print_failures(failures(result.history))
    print(f"results: {out}/summary.json, metrics.csv, accuracy_per_round.png"
          + (", defense.csv, defense_examples.png" if result.defense else ""))
    return 0


def _print_failures(failed: list[dict]) -> None:
    for f in failed:
        who = f"client {f['client']}" if f.get("client") is not None else f"node {f['node']}"
        print(f"  round {f['round']}: {who} failed ({f['phase']}) and was left out of that round: {f['error']}")


def _pretrain(phase: str):
    def run(args: argparse.Namespace) -> int:
        from medfedpure.workflows.training import run_pretraining

        cfg = _config(args)
        out = _out(args, cfg)
        print(f"medfedpure pretrain-{phase}: preset {args.preset} ({cfg.defense.training}) -> {out}", flush=True)
        summary = run_pretraining(cfg, phase, out, **_run_options(args))
        last = summary["rows"][-1]
        print(f"\nfinished in {summary['wall_time_s'] / 60:.1f} min; train loss {last['train_loss']:.4f}, "
              f"held-out loss {last['test_loss']:.4f}; checkpoint {out}/{phase}.safetensors")
        return 0
    return run


def _experiment(args: argparse.Namespace) -> int:
    from medfedpure.workflows.experiment import run_experiment
    from medfedpure.methods import parse_methods

    cfg = _config(args)
    out = _out(args, cfg)
    methods = parse_methods(args.methods)
    print(f"medfedpure experiment: preset {args.preset}, methods {', '.join(methods)} -> {out} "
          "(rerun the same command to resume)", flush=True)
    tables = run_experiment(cfg, out, methods=methods, transfer=not args.no_transfer, suite=not args.no_suite,
                            **_run_options(args))
    _print_tables(tables, out)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    data = None if args.own_test else args.data
    if args.attack:
        from medfedpure.attacks import parse_attacks
        from medfedpure.evaluation.attack_suite import evaluate_suite

        result = evaluate_suite(args.run, data, parse_attacks(args.attack), args.client, args.overrides, args.out,
                                args.max_per_client, progress=not args.no_progress)
        print(open(Path(result["out"]) / "evaluation.md").read())
        print(f"written to {result['out']}/evaluation.json, evaluation.csv, evaluation.md, robustness.png")
        return 0
    from medfedpure.workflows.evaluate import evaluate_run

    if args.max_per_client is not None:
        raise ValueError("--max-per-client goes with --attack (the paper-protocol evaluation attacks every scan)")
    result = evaluate_run(args.run, data, args.client, args.overrides, args.out, progress=not args.no_progress)
    print(open(Path(result["out"]) / "evaluation.md").read())
    print(f"written to {result['out']}/evaluation.json, evaluation.csv, evaluation.md")
    return 0


def _compare_defenses(args: argparse.Namespace) -> int:
    from medfedpure.reporting.published import publish_path
    from medfedpure.workflows.compare import compare_defenses, publish

    if args.publish is not None:
        publish_path(args.publish)
    result = compare_defenses(args.spec, args.out, progress=not args.no_progress)
    print(open(Path(args.out) / "candidates.md").read())
    print(f"written to {args.out}/candidates.md, candidates.json, candidates.png (one folder per candidate)")
    if args.publish is not None:
        written = publish(result, args.publish)
        print(f"published to {', '.join(map(str, written))}: `medfedpure report --docs` puts it in every document "
              f"with the block 'results/{args.publish.stem}'")
    return 0 if result.rows else 1


def _holdout(args: argparse.Namespace) -> int:
    from medfedpure.data.holdout import export_holdout

    record = export_holdout(Path(args.run), Path(args.data), Path(args.out), args.per_class, args.copy)
    how = "copied" if args.copy else "linked"
    print(f"{sum(record['per_class'].values())} scans run {args.run} never used ({how}; "
          f"{record['n_held_out_total']} held out, {record['n_used_by_run']} used by the run) -> {args.out}")
    for name, n in record["per_class"].items():
        print(f"  {name}: {n}")
    print(f"next: medfedpure evaluate --run {shlex.quote(str(args.run))} --data {shlex.quote(str(args.out))}")
    return 0


def _transfer(args: argparse.Namespace) -> int:
    from medfedpure.evaluation.transfer import transfer_matrix

    result = transfer_matrix(Path(args.run), progress=not args.no_progress)
    for kind in ("bare", "defended"):
        if kind in result:
            r = result[kind]
            print(f"{result['method']} ({kind} victims): white-box {100 * r['diagonal_mean']:.2f}%, "
                  f"transferred from other clients {100 * r['off_diagonal_mean']:.2f}% "
                  f"(their scans unattacked: {100 * r['clean_off_diagonal_mean']:.2f}%)")
    print(f"written to {args.run}/transfer.json, transfer.csv, transfer.png")
    return 0


def _report(args: argparse.Namespace) -> int:
    if args.docs and args.publish is not None:
        raise ValueError("report --publish goes with --run RUN (the run whose rows it keeps), not with --docs")
    if args.docs:
        return _report_docs(args)
    if args.run is None or args.check:
        raise ValueError("report needs --run RUN (a run folder's tables) or --docs [--check] (the published ones)")
    from medfedpure.reporting.published import publish_path
    from medfedpure.workflows.report import publish_tables, write_report

    if args.add and args.publish is None:
        raise ValueError("report --add goes with --publish FILE.json (the published rows it adds this run's to)")
    if args.publish is not None:
        publish_path(args.publish)
    if args.add and not args.publish.is_file():
        raise ValueError(f"report --add: nothing is published at {args.publish} yet (publish without --add)")
    tables = write_report(Path(args.run))
    _print_tables(tables, Path(args.run))
    if args.publish is not None:
        written = publish_tables(tables, args.publish, add=args.add)
        print(f"published to {', '.join(map(str, written))}: `medfedpure report --docs` puts its rows in every "
              f"document with the block 'results/{args.publish.stem}'")
    return 0


def _report_docs(args: argparse.Namespace) -> int:
    from medfedpure.workflows.docs import DOCUMENTS, PUBLISHED, regenerate_docs

    root = Path(args.root)
    changed = regenerate_docs(root, check=args.check)
    if args.check and changed:
        print(f"{', '.join(changed)}: a results table is not what {PUBLISHED} gives; run `medfedpure report --docs`",
              file=sys.stderr)
        return 1
    print(f"{', '.join(changed) or 'nothing'} {'to rewrite' if args.check else 'rewritten'} "
          f"(of {', '.join(DOCUMENTS)}, from {root / PUBLISHED})")
    return 0


def _print_tables(tables: dict, out: Path) -> None:
    from medfedpure.reporting.rows import MethodRow

    rows = [MethodRow.from_dict(r) for r in tables["rows"]]
    with_paper = any(r.paper_clean is not None for r in rows)
    print(f"\nTable {tables['table']} rows: clean % / adv % (the paper's protocol: PGD on the classifier"
          + (", the paper's figures in brackets" if with_paper else "") + "); headline: the strongest attack that "
          "knows the defense, first draw, with its 95% interval")
    for r in rows:
        ours = "not run" if r.clean is None else f"{r.clean} / {r.adv}"
        paper = "" if r.paper_clean is None else f"  [{r.paper_clean} / {r.paper_adv}]"
        print(f"  {r.method:<48} {ours:>15}{paper}")
        if r.adaptive is not None:
            lo, hi = r.adaptive_ci
            print(f"  {'':<48} headline {r.adaptive}% [{lo}, {hi}] under {r.adaptive_attack}")
    for r in tables.get("transfer", []):
        print(f"  internal evasion, {r['method']}: white-box {r['white_box_diagonal']}%, "
              f"from other clients {r['transfer_off_diagonal']}% (unattacked {r.get('clean_off_diagonal')}%)")
    print(f"tables: {out}/tables.md, tables.csv, tables.json; figures: accuracy_per_round.png"
          + (", methods.png" if len(tables["rows"]) > 1 else "") + (", transfer.png" if tables.get("transfer") else ""))


def _certs(args: argparse.Namespace) -> int:
    from medfedpure.federation.certificates import make_local_certificates

    files = make_local_certificates(Path(args.out), args.nodes)
    print(f"wrote {len(files)} files to {args.out}: ca.crt (give it to every SuperNode and flwr), server.pem + "
          f"server.key (the SuperLink's), node01..node{args.nodes:02d} .key/.pub (one pair per SuperNode; register "
          "each .pub with `flwr supernode register`); valid for 127.0.0.1 and localhost, 30 days")
    return 0


def _deploy_local(args: argparse.Namespace) -> int:
    from medfedpure.workflows.deploy_local import deploy_local

    cfg = _config(args)
    if args.nodes is not None:
        cfg.data.num_clients = args.nodes
    out = _out(args, cfg)
    print(f"medfedpure deploy-local: preset {args.preset}, {cfg.data.num_clients} SuperNodes on 127.0.0.1 "
          f"({'plaintext' if args.insecure else 'TLS, SuperNode authentication'}) -> {out}", flush=True)
    summary = deploy_local(cfg, out, secure=not args.insecure, progress=not args.no_progress)
    f = summary["final"]
    print(f"finished: round {f['round']} weighted mean over the hospitals: clean acc {100 * f['clean_acc']:.2f}%"
          + (f", {summary['attack']} acc {100 * f['adv_acc']:.2f}%" if f.get("adv_acc") is not None else ""))
    for failure in summary.get("failures", []):
        print(f"  round {failure['round']} ({failure['phase']}): client {failure['client']} failed: {failure['error']}")
    print(f"results: {out}/tables.md, summary.json, metrics.csv; each process's log in {out}/logs/")
    return 0


def _export(args: argparse.Namespace) -> int:
    from medfedpure.serving.bundle import export_bundle
    from medfedpure.storage import read_json

    out = export_bundle(args.run, args.client, args.out, sign_key=args.sign_key)
    model_id = read_json(out / "manifest.json")["digest"][:16]  # load_bundle's id, without building the model
    print(f"wrote client {args.client}'s defended classifier to {out}/ (model.safetensors, manifest.json"
          + (", signature.ed25519" if args.sign_key else "") + f"); model id {model_id}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from medfedpure.data.scans import list_scans
    from medfedpure.serving.predict import Predictor, save_views

    predictor = Predictor(args.model, seed=args.seed, trust=args.trust)
    files = list_scans(args.scans)
    reports, failed = [], 0
    for index, path in enumerate(tqdm(files, desc="scans", unit="scan", disable=args.no_progress or len(files) < 2)):
        try:  # every readable scan is answered; an unreadable one is reported beside them
            answer = predictor.predict_file(path, str(path), args.nifti_slice, views=bool(args.save_views))
        except (DataError, ValueError) as err:
            failed += 1
            reports.append({"file": str(path), "error": str(err).splitlines()[0]})
            if not args.json:
                tqdm.write(f"{path}: not answered: {reports[-1]['error']}", file=sys.stderr)
            continue
        report = answer.report
        if args.save_views:
            # numbered: two scans of the same name in different folders never share their views
            report["views"] = save_views(answer, Path(args.save_views), f"{index:04d}-{Path(path).name.split('.')[0]}")
        reports.append(report)
        if not args.json:
            tqdm.write(f"{path}: {report['label']} ({100 * report['probability']:.1f}%, {report['draws']} "
                       f"purification(s) agree {100 * report['agreement']:.0f}%{', REVIEW' if report['review'] else ''}"
                       f"), {report['detector']} score {report['score']:.4g} (percentile "
                       f"{report['score_percentile']:.0f} of clean scans), "
                       f"{'FLAGGED' if report['flagged'] else 'not flagged'}, t*={report['t_star']}")
    if args.json:
        print(json.dumps(reports if len(reports) != 1 else reports[0], indent=2))
    if failed:
        print(f"{failed} of {len(files)} scan(s) could not be answered", file=sys.stderr)
    return 1 if failed else 0


def _serve(args: argparse.Namespace) -> int:
    from medfedpure.serving.service import check_exposure, read_token, serve

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    token = read_token(args.token_file)
    key = read_token(args.noise_key_file).encode() if args.noise_key_file else None  # same rules as a token
    warning = check_exposure(args.host, token, args.tls_cert is not None)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    scheme = "https" if args.tls_cert else "http"
    print(f"medfedpure serve: {args.model} on {scheme}://{args.host}:{args.port}/ (API: /docs; "
          f"{'token required' if token else 'no token'}; audit log: {args.audit_log or 'none'})", flush=True)
    serve(args.model, args.host, args.port, args.max_upload_mb, token=token,
          tls=(args.tls_cert, args.tls_key) if args.tls_cert else None, audit_log=args.audit_log, noise_key=key,
          trust=args.trust, rate_limit=args.rate_limit)
    return 0


def _presets(args: argparse.Namespace) -> int:
    for name in preset_names():
        if args.show:
            print(f"# {name}\n{json.dumps(load_preset(name).to_dict(), indent=2)}")
        else:
            print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medfedpure", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--loopback-only", action="store_true",
                        help="run in a network namespace of its own that has only the loopback interface, so "
                             "the simulation's Ray servers (which listen on every interface) are reachable from "
                             "this machine alone; needs `unshare` and `ip` and unprivileged user namespaces")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", default="demo", help=f"built-in preset ({', '.join(preset_names())}) or a YAML file")
        p.add_argument("--data", help="data folder (Br35H yes/no, CIFAR-10, or one folder per class)")
        p.add_argument("--out", help="run folder, shared by all phases (default runs/<preset name>)")
        p.add_argument("--seed", type=int, help="random seed (default from the preset)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("overrides", nargs="*", metavar="section.field=value",
                       help="config overrides, e.g. train.rounds=3 data.num_clients=5")

    p = sub.add_parser("pretrain-diffusion", help="phase 1: train the diffusion purifier on clean scans")
    common(p)
    p.set_defaults(func=_pretrain("diffusion"))
    p = sub.add_parser("pretrain-mae", help="phase 2: train the MAE detector on clean scans")
    common(p)
    p.set_defaults(func=_pretrain("mae"))
    p = sub.add_parser("train", help="phase 3: federated personalized MoE, PGD every round, then the defended "
                                     "evaluation when the run folder holds the phase 1-2 checkpoints; or a baseline")
    common(p)
    p.add_argument("--method", choices=list(METHOD_NAMES), help="federated method (default: the preset's, medfedpure)")
    p.set_defaults(func=_train)

    p = sub.add_parser("experiment", help="every phase and the evaluation, then the tables; resumes after an "
                                          "interruption (finished phases and rounds are not redone)")
    common(p)
    p.add_argument("--methods", default="medfedpure",
                   help=f"comma-separated methods to train and compare, or 'all' ({', '.join(METHOD_NAMES)}); "
                        "baselines go to <out>/baselines/<method>")
    p.add_argument("--no-transfer", action="store_true", help="skip the internal-evasion (transfer) matrix")
    p.add_argument("--no-suite", action="store_true",
                   help="skip the attack suite (attack.suite on attack.suite_max_per_client scans per client)")
    p.set_defaults(func=_experiment)

    p = sub.add_parser("evaluate", help="evaluate a trained federation (bare and defended, clean and attacked) "
                                        "on any labelled folder, e.g. scans no client saw")
    p.add_argument("--run", required=True, help="run folder written by experiment or train")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="labelled folder: the run's layout (e.g. Br35H yes/ no/) or one "
                                       "sub-folder per class (e.g. what holdout writes)")
    source.add_argument("--own-test", action="store_true",
                        help="each client's own test split from the run (e.g. a stronger attack: attack.steps=50)")
    p.add_argument("--attack", metavar="NAME[,NAME]",
                   help=suite_help())
    p.add_argument("--max-per-client", type=int, metavar="N",
                   help="attack at most N scans per client, spread evenly over its split (default: all)")
    p.add_argument("--client", default="all", help="client index, or 'all' (default)")
    p.add_argument("--out", help="where to write (default <run>/evaluations/<data folder name>[-suite])")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="e.g. attack.eps=0.03 attack.steps=20 defense.mode=selective")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("compare-defenses", help="defense candidates (trained runs + defense.* overrides) under the "
                                                 "same attack suite on the same scans; resumes")
    p.add_argument("spec", help="YAML: attacks, max_per_client, overrides, candidates [{name, run, overrides}]")
    p.add_argument("--out", required=True, help="folder for the comparison (one sub-folder per candidate)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--publish", type=Path, metavar="FILE.json",
                   help="also write the result here (docs/results/NAME.json) for `medfedpure report --docs`")
    p.set_defaults(func=_compare_defenses)

    p = sub.add_parser("holdout", help="write the scans in a data folder that a run never used (it may train on "
                                       "data.max_per_class of them) as class folders, to evaluate it on them")
    p.add_argument("--run", required=True, help="run folder written by experiment or train")
    p.add_argument("--data", required=True, help="the data folder the run trained on (on this machine)")
    p.add_argument("--out", required=True, help="new folder for the held-out scans, one sub-folder per class")
    p.add_argument("--per-class", type=int, help="at most this many per class (a seeded, repeatable draw)")
    p.add_argument("--copy", action="store_true", help="copy the files (default: symbolic links to them)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_holdout)

    p = sub.add_parser("transfer", help="internal evasion: each client's PGD scans sent to every other client "
                                        "(victim-by-attacker accuracy matrix)")
    p.add_argument("--run", required=True, help="a method's run folder (the experiment folder, or baselines/<method>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_transfer)

    p = sub.add_parser("report", help="rebuild tables and figures from a run folder's saved results, or the "
                                      "documents' results tables from docs/results/ (--docs)")
    p.add_argument("--run", help="run folder written by experiment or train")
    p.add_argument("--docs", action="store_true",
                   help="regenerate the results tables of README.md and docs/results.md from docs/results/*.json")
    p.add_argument("--check", action="store_true", help="with --docs: compare only; exit 1 where a table differs")
    p.add_argument("--root", default=".", help="with --docs: the repository (default: here)")
    p.add_argument("--publish", type=Path, metavar="FILE.json",
                   help="with --run: keep its Table I / II rows in docs/results/ (e.g. docs/results/NAME.json), "
                        "for the documents' block 'results/NAME' (`report --docs`)")
    p.add_argument("--add", action="store_true",
                   help="with --publish: the methods this run did not make keep the rows FILE.json already holds "
                        "(another run of the same preset and seed, e.g. one method rerun on its own); each run named")
    p.set_defaults(func=_report)

    p = sub.add_parser("certs", help="TLS certificates and SuperNode keys for trying the deployment runtime on "
                                     "this machine (127.0.0.1)")
    p.add_argument("--out", required=True, help="new folder for ca.crt, server.pem/.key and the node key pairs")
    p.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs to make (default 3)")
    p.set_defaults(func=_certs)

    p = sub.add_parser("deploy-local", help="the federation on Flower's deployment runtime on this machine: a "
                                            "SuperLink and one SuperNode per hospital on 127.0.0.1, TLS and node "
                                            "authentication, each hospital on its own folder")
    common(p)
    p.add_argument("--nodes", type=int, help="hospitals (SuperNodes); default data.num_clients of the preset")
    p.add_argument("--insecure", action="store_true", help="plaintext and no node authentication (debugging only)")
    p.set_defaults(func=_deploy_local)

    p = sub.add_parser("export", help="one hospital's defended classifier as a self-contained folder (weights + "
                                      "manifest) for predict and serve")
    p.add_argument("--run", required=True, help="run folder written by experiment, train or deploy-local")
    p.add_argument("--client", type=int, required=True, help="the hospital (client index)")
    p.add_argument("--out", required=True, help="new folder for model.safetensors and manifest.json")
    p.add_argument("--sign-key", help="the hospital's Ed25519 private key (PEM; `openssl genpkey -algorithm ed25519 "
                                      "-out key.pem`): writes signature.ed25519, which predict/serve --trust check")
    p.set_defaults(func=_export)

    p = sub.add_parser("predict", help="classify scans (JPEG/PNG/DICOM/NIfTI files or folders) with an exported model")
    p.add_argument("--model", required=True, help="folder written by `medfedpure export`")
    p.add_argument("--trust", help="an Ed25519 public key (PEM): use the model only if it was signed with its key")
    p.add_argument("scans", nargs="+", help="scan files or folders")
    p.add_argument("--json", action="store_true", help="print JSON (one object per scan)")
    p.add_argument("--save-views", metavar="DIR", help="write each scan's purified view and MAE error map as PNGs")
    p.add_argument("--nifti-slice", type=int, help="axial slice of a 3-D NIfTI (default: the middle one)")
    p.add_argument("--seed", type=int, help="purification noise seed (default: the hospital's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_predict)

    p = sub.add_parser("serve", help="an HTTP service and web page for an exported model (FastAPI)")
    p.add_argument("--model", required=True, help="folder written by `medfedpure export`")
    p.add_argument("--trust", help="an Ed25519 public key (PEM): serve the model only if it was signed with its key")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted (default 20 MB)")
    p.add_argument("--token-file", help="a file whose first line is the access token (16+ characters): /info and "
                                        "/predict then need 'Authorization: Bearer <token>'; required off loopback")
    p.add_argument("--tls-cert", help="TLS certificate (PEM) to serve HTTPS, with --tls-key")
    p.add_argument("--tls-key", help="the certificate's private key (PEM)")
    p.add_argument("--audit-log", help="append one JSON line per request (time, client, file, SHA-256, model id, "
                                       "status, answer) to this file")
    p.add_argument("--rate-limit", type=int, default=120,
                   help="scan requests a client address may send per minute (default 120; 0: no limit)")
    p.add_argument("--noise-key-file", help="a secret (first line, 16+ characters) the purification noise of each scan "
                                            "is keyed with, so the same scan gets the same answer across restarts "
                                            "too (default: a fresh secret per start)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("presets", help="list the built-in presets")
    p.add_argument("--show", action="store_true", help="print each preset's full config")
    p.set_defaults(func=_presets)
    return parser


_NETNS_MARK = "MEDFEDPURE_LOOPBACK_ONLY"


def loopback_only_unavailable() -> str | None:
    """Why this machine cannot give a command a network namespace of its own, or None if it can."""
    missing = [tool for tool in ("unshare", "ip") if shutil.which(tool) is None]
    if missing:
        return f"--loopback-only needs {' and '.join(missing)} (util-linux, iproute2) on the PATH"
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return ("--loopback-only: this machine does not allow a network namespace of one's own "
                f"(unshare --user --net: {probe.stderr.strip() or probe.returncode}); run behind a firewall")
    return None


def _rerun_loopback_only(argv: list[str]) -> int:
    """Run this same command again inside a new user + network namespace with only `lo` up.

    Ray 2.55 binds its gRPC servers to every interface and has no setting for it; in a namespace
    of its own the only interface is loopback, so nothing it opens is reachable from outside."""
    problem = loopback_only_unavailable()
    if problem:
        raise ConfigError(problem)
    cmd = ["unshare", "--user", "--map-root-user", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
           sys.executable, "-m", "medfedpure.cli", *argv]
    return subprocess.call(cmd, env=dict(os.environ, **{_NETNS_MARK: "1"}))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rerun = args.loopback_only and os.environ.get(_NETNS_MARK) != "1"
    if args.loopback_only and not rerun:
        names = sorted(name for _, name in socket.if_nameindex())
        logging.getLogger("medfedpure").info("network: a namespace of its own, interfaces %s", ", ".join(names))
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's in-memory database set-up
    from medfedpure.federation.strategy import FederationError

    try:
        return _rerun_loopback_only(argv) if rerun else args.func(args)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, ValueError, FederationError) as err:  # incl. Report/ResumeError
        if args.verbose:
            raise
        print(f"medfedpure: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
