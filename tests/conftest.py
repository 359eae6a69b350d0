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
