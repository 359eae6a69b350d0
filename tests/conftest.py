import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The suite runs on two pytest-xdist workers (pyproject's addopts) on as few as 2 cores: idle torch
# (OpenMP) threads sleep instead of spinning, so one worker's waits do not slow the other's work.
# Set before any test module imports torch; Ray's and the deployment's processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_collection_modifyitems(config, items):
    """Two lanes: the fast tests first, then the slow ones (`@pytest.mark.slow`: end-to-end Flower
    runs), each lane in file order, so a broken unit shows within minutes and both lanes always run;
    `pytest -m "not slow"` runs the fast lane alone. On pytest-xdist workers (pyproject's addopts:
    `-n 2 --dist loadfile`, each file on one worker) the unit of work is a file, handed out in this
    order: the files with end-to-end runs first, most of them first, and the unit-test files last, so
    they fill whichever worker frees first instead of one long file running alone at the end."""
    if getattr(config.option, "dist", "no") == "no":
        items.sort(key=lambda item: item.get_closest_marker("slow") is not None)  # stable: file order kept
        return
    slow, first = {}, {}
    for i, item in enumerate(items):
        first.setdefault(item.path, i)
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: (-slow[item.path], first[item.path], item.get_closest_marker("slow") is not None))


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """Flower, Ray and the image cache write under a temporary folder, never the user's home."""
    root = tmp_path_factory.mktemp("env")
    os.environ["FLWR_HOME"] = str(root / "flwr")
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    os.environ["MEDFEDPURE_CACHE"] = str(root / "cache")
    yield


def demo(*overrides: str):
    """The built-in demo preset, a fresh copy, with `overrides` (`section.field=value`) applied: the
    config most tests start from."""
    from medfedpure.config import apply_overrides, load_preset

    return apply_overrides(load_preset("demo"), list(overrides))


def tiny_experiment():
    """The smallest experiment with every phase: 2 hospitals, 2 rounds, one round of each defense
    phase, the experts trained on purified scans (as the shipped default), the defended evaluation with
    two detectors and a three-attack suite on 3 scans a hospital."""
    cfg = demo()
    cfg.data.num_clients = 2
    cfg.data.synthetic_per_class = 120
    cfg.train.rounds = 2
    cfg.train.local_epochs = 1
    cfg.attack.max_eval_per_client = 8
    cfg.attack.suite, cfg.attack.suite_max_per_client = ["eot-pgd", "eot-pgd:margin", "square"], 3
    cfg.attack.adaptive_steps, cfg.attack.eot, cfg.attack.square_queries, cfg.attack.draws = 2, 2, 5, 3
    cfg.defense.purify_training = True
    cfg.defense.eval_detectors = ["mae", "disagreement"]
    for part in (cfg.defense.mae, cfg.defense.diffusion):
        part.train.rounds, part.train.local_epochs = 1, 1
    return cfg


@pytest.fixture(scope="session")
def tiny_experiment_run(tmp_path_factory) -> Path:
    """`experiment` on tiny_experiment() (every phase, the defended evaluation, the suite, the transfer
    table), run once per test session and shared by the pytest-xdist workers: the first to ask runs it
    under a file lock, the others wait and reuse it. Tests never write into it; use a copy
    (`copy_of_tiny_experiment`)."""
    from filelock import FileLock

    from medfedpure.workflows.experiment import run_experiment

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above every worker's own
    run = root / "tiny-experiment"
    with FileLock(str(root / "tiny-experiment.lock")):
        if not (run / "tables.json").is_file():  # not yet, or cut short: the experiment resumes
            run_experiment(tiny_experiment(), run, progress=False)
    return run


@pytest.fixture(scope="module")
def copy_of_tiny_experiment(tiny_experiment_run, tmp_path_factory) -> Path:
    """A copy of the shared tiny experiment for this test module (its tests may change it)."""
    import shutil

    run = tmp_path_factory.mktemp("run") / "run"
    shutil.copytree(tiny_experiment_run, run)
    return run


def write_images(folder: Path, n: int, size=(40, 30), seed=0, fmt="JPEG", mode="RGB") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        img = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode)
        p = folder / f"img{i}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
        img.save(p, fmt)
        paths.append(p)
    return paths


@pytest.fixture
def br35h_like(tmp_path) -> Path:
    """A tiny Br35H layout: yes/ and no/ JPEGs of mixed sizes and modes."""
    root = tmp_path / "br35h"
    write_images(root / "yes", 6, size=(50, 40), seed=1)
    write_images(root / "no", 5, size=(30, 60), seed=2, mode="L")
    return root


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "br35h" / "yes").is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA} (they are not part of the repository)")
    return SHARED_DATA
