"""What `docs/results/` keeps: a result published by `compare-defenses --publish` or
`report --run RUN --publish`, checked for its path before hours of work and naming run folders
from the home folder (~/runs/...), as the commands that made them do, not one machine's paths."""

from __future__ import annotations

from pathlib import Path


def publish_path(path: Path | str) -> Path:
    """Where `--publish` writes: a .json file, checked before hours of attacks, not after."""
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"--publish {path}: a .json file (e.g. docs/results/NAME.json)")
    return path


def from_home(path: str) -> str:
    """`path` with the home folder written as ~."""
    home = str(Path.home())
    return "~" + path[len(home):] if path.startswith(home + "/") else path


__all__ = ["from_home", "publish_path"]
