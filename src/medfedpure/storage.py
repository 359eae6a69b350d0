"""Atomic writes: a crash mid-write never leaves a truncated result or checkpoint."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what a plain open() would give, not mkstemp's 0600


@contextlib.contextmanager
def atomic_folder(out: Path | str):
    """A new folder built under a temporary name beside `out` (yielded) and renamed to `out` only
    when the block finishes; on any error it is removed. `out` may exist only as an empty folder."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # what mkdir would give, not mkdtemp's 0700
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def folder_kept_only_if_used(folder: Path | str):
    """Create `folder` (and missing parents) for the block. If the block fails and left them empty,
    remove what it created: a refusal writes nothing, not even an empty --out folder."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for p in created:  # deepest first
            with contextlib.suppress(OSError):
                if p.is_dir() and not any(p.iterdir()):
                    p.rmdir()
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path | str) -> Any:
    """A JSON file the project wrote; a missing or damaged one is named."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"'{path}' does not exist") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"'{path}' is not valid JSON ({err}); it may have been edited or damaged") from err


def write_csv(path: Path | str, rows: Iterable[dict[str, Any]]) -> None:
    rows = list(rows)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def save_tensors(path: Path | str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file, written atomically."""
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(clean, metadata=metadata))


def load_tensors(path: Path | str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types
        raise ValueError(f"checkpoint '{path}' is not a readable safetensors file ({err})") from err


def tensor_metadata(path: Path | str) -> dict[str, str]:
    """The string metadata a safetensors file was saved with ({} for none); a damaged file is named."""
    try:
        with safe_open(str(path), "pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as err:  # noqa: BLE001 - safetensors raises several types
        raise ValueError(f"checkpoint '{path}' is not a readable safetensors file ({err})") from err
