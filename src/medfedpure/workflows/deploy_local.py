"""`medfedpure deploy-local`: a whole deployment on this machine, the way hospitals run it.

It deals the data into one folder per hospital (`hospitals/hospital-<i>`, the simulation's
partition), makes a CA, the SuperLink's TLS certificate and one key pair per SuperNode
(`certs/`), starts a SuperLink with TLS and SuperNode authentication on 127.0.0.1, registers
the nodes' public keys, starts one SuperNode per hospital (its own `data-dir` and `state-dir`),
runs the app with `flwr run`, and stops every process it started, by process group, also on
Ctrl-C or an error. The run folder gets the same files as a simulation run; each process's log
is in `logs/`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from medfedpure.config import ExperimentConfig
from medfedpure.data.hospitals import write_hospital_folders
from medfedpure.federation.certificates import make_local_certificates
from medfedpure.federation.simulation import FLOWER_ENV
from medfedpure.methods import task
from medfedpure.runfolder import SUMMARY, client_dir
from medfedpure.storage import atomic_write_text, read_json

log = logging.getLogger(__name__)

CONNECTION = "medfedpure-local"
APP_PYPROJECT = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "medfedpure-deployment"
version = "0.1.0"
dependencies = []

[tool.flwr.app]
publisher = "medfedpure"

[tool.flwr.app.components]
serverapp = "medfedpure.workflows.deployment:app"
clientapp = "medfedpure.federation.client_app:app"

[tool.flwr.app.config]
preset = "demo"
overrides = ""
experiment-json = ""
out-dir = ""
"""


class DeploymentError(RuntimeError):
    """A process of the local deployment failed; the message names it and its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1, each started in its own process group and stopped
    by it. Use as a context manager: leaving it stops everything still running."""

    def __init__(self, out: Path, nodes: int, secure: bool = True) -> None:
        self.out, self.nodes, self.secure = Path(out), nodes, secure
        self.certs, self.logs, self.home = self.out / "certs", self.out / "logs", self.out / "flwr-home"
        self.app_dir = self.out / "app"
        self.port = free_port()
        self.node_ports = [free_port() for _ in range(nodes)]
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.home)}
        self.connection = CONNECTION + ("" if secure else "-insecure")

    # ------------------------------------------------------------------ set-up
    def prepare(self) -> None:
        """Certificates and node keys (kept if already there), the `flwr` connection, the app folder."""
        if self.secure and not (self.certs / "ca.crt").is_file():
            make_local_certificates(self.certs, self.nodes)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        target = f'address = "127.0.0.1:{self.port}"\n'
        target += f'root-certificates = "{self.certs / "ca.crt"}"\n' if self.secure else "insecure = true\n"
        atomic_write_text(self.home / "config.toml",
                          f'[superlink]\ndefault = "{self.connection}"\n\n[superlink.{self.connection}]\n{target}')
        atomic_write_text(self.app_dir / "pyproject.toml", APP_PYPROJECT)

    # ------------------------------------------------------------------ processes
    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log_file = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=self.env, cwd=self.out,
                                start_new_session=True)
        log_file.close()
        self.processes[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
        """Stop a process and everything it started (its process group), by its pid."""
        proc = self.processes.pop(name, None)
        if proc is None:
            return
        for s in (sig, signal.SIGKILL):
            try:
                os.killpg(proc.pid, s)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace_s)
                if s == signal.SIGKILL:
                    break
            except subprocess.TimeoutExpired:
                continue
        try:  # children that outlived their leader
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def stop_all(self) -> None:
        for name in list(self.processes)[::-1]:
            self.stop(name)

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    # ------------------------------------------------------------------ the deployment
    def start_superlink(self) -> None:
        argv = [_tool("flower-superlink"), "--port", str(self.port), "--database", ":flwr-in-memory:",
                "--disable-runtime-dependency-installation"]
        if self.secure:
            argv += ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                     "--ssl-keyfile", str(self.certs / "server.key"), "--enable-supernode-auth"]
        else:
            argv += ["--insecure"]
        self.start("superlink", argv)
        self._wait_for_port(self.port, "superlink")

    def register(self, node: int) -> None:
        """Register hospital `node`'s public key with the SuperLink (only registered keys may join)."""
        self.flwr(["supernode", "register", str(self.node_key(node, "pub")), self.connection], f"register-{node}")

    def node_key(self, node: int, ext: str) -> Path:
        return self.certs / f"node{node + 1:02d}.{ext}"

    def start_supernode(self, node: int, data_dir: Path, state_dir: Path, key: Path | None = None) -> None:
        """Hospital `node`'s SuperNode on its own folder; `key` replaces its registered key pair (tests)."""
        node_config = (f'partition-id={node} num-partitions={self.nodes} data-dir="{data_dir}" '
                       f'state-dir="{state_dir}"')
        argv = [_tool("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--node-config", node_config,
                "--port", str(self.node_ports[node])]
        if self.secure:
            key = key or self.node_key(node, "key")
            argv += ["--root-certificates", str(self.certs / "ca.crt"), "--auth-supernode-private-key", str(key)]
        else:
            argv += ["--insecure"]
        self.start(f"supernode-{node}", argv)

    def run_app(self, run_config: dict[str, str]) -> subprocess.Popen:
        """`flwr run` of the app with this run config; returns the process (it streams the run's log)."""
        path = self.out / "run_config.toml"
        atomic_write_text(path, "".join(f"{k} = {json.dumps(v)}\n" for k, v in run_config.items()))
        return self.start("flwr-run", [_tool("flwr"), "run", str(self.app_dir), self.connection,
                                       "--run-config", str(path), "--stream"])

    def flwr(self, args: list[str], name: str, timeout_s: float = 120.0) -> str:
        """A `flwr` CLI command against the SuperLink; its output, or one error naming its log."""
        done = subprocess.run([_tool("flwr"), *args], env=self.env, cwd=self.app_dir, capture_output=True,
                              text=True, timeout=timeout_s)
        atomic_write_text(self.logs / f"{name}.log", done.stdout + done.stderr)
        if done.returncode != 0:
            raise DeploymentError(f"`flwr {' '.join(args[:2])}` failed (exit {done.returncode}); "
                                  f"see {self.logs / f'{name}.log'}")
        return done.stdout

    def _wait_for_port(self, port: int, name: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise DeploymentError(f"{name} exited with code {self.processes[name].returncode}; "
                                      f"see {self.logs / f'{name}.log'}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise DeploymentError(f"{name} did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s")


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a `kill`, a job scheduler) unwinds like Ctrl-C, so every started process is stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _tool(name: str) -> str:
    """A Flower command from this Python's environment (found even when it is not on PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def hospital_config(cfg: ExperimentConfig, out: Path, progress: bool = True) -> ExperimentConfig:
    """Deal `cfg`'s data into `out/hospitals/hospital-<i>` (the simulation's partition) and return the
    config that reads each hospital's own folder (`data.layout=hospitals`, classes named)."""
    data, splits = task.data_and_splits(cfg, progress=progress)
    source = {"data": replace(cfg.data, cache_dir=None).__dict__, "seed": cfg.seed}
    folder = write_hospital_folders(data, splits, out / "hospitals", source)
    dataset = "folder" if cfg.data.dataset == "synthetic" else cfg.data.dataset
    return replace(cfg, data=replace(cfg.data, dataset=dataset, layout="hospitals", root=str(folder),
                                     classes=list(data.classes), max_per_class=None))


def deploy_local(cfg: ExperimentConfig, out: Path | str, secure: bool = True, progress: bool = True,
                 timeout_s: float = 6 * 3600.0) -> dict:
    """The whole local deployment; returns the run's summary."""
    out = Path(out).resolve()
    cfg = hospital_config(cfg.validate(), out, progress)
    n = cfg.data.num_clients
    with LocalFederation(out, n, secure) as fed, _terminate_as_interrupt():
        fed.prepare()
        fed.start_superlink()
        for i in range(n):
            if secure:
                fed.register(i)
            fed.start_supernode(i, Path(cfg.data.root) / f"hospital-{i}", client_dir(out, i))
        run = fed.run_app({"experiment-json": cfg.to_json(), "out-dir": str(out)})
        log.info("deployment running: SuperLink 127.0.0.1:%d, %d SuperNodes; logs in %s", fed.port, n, fed.logs)
        try:
            code = run.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise DeploymentError(f"the run did not finish within {timeout_s:.0f} s; see {fed.logs}") from err
    summary = out / SUMMARY
    if code != 0 or not summary.is_file():
        raise DeploymentError(f"the deployed run failed (flwr run exit {code}); see {fed.logs / 'flwr-run.log'} "
                              f"and {fed.logs / 'superlink.log'}")
    return read_json(summary)
