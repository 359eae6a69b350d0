"""Load test of `medfedpure serve`: bounded, on 127.0.0.1, stops by itself.

    python benchmarks/load.py --model MODEL_DIR --scan SCAN [--requests 300] [--concurrency 8]
                              [--hostile-every N] [--out benchmarks/load.json]

Starts the service in its own process on a free port, sends `--requests` uploads of `--scan`
from `--concurrency` threads, then stops the service by its pid. Writes requests/s,
p50/p95/p99 latency, the error count and the service's peak RSS (its VmHWM) to the JSON.
With `--hostile-every N`, every Nth upload is hostile instead, in turn a decompression-bomb PNG
(12000 x 12000 pixels in about 140 KB) and a voxel-bomb NIfTI (512 x 512 x 512 voxels, 256 MB
inflated, in about 250 KB): each must be refused (HTTP 422) while the scans are still answered
(HTTP 200), with the service's peak RSS bounded; anything else counts as an error.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from medfedpure.storage import write_json


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the service did not answer /health within {timeout_s:.0f} s")


def hostile_uploads() -> list[tuple[str, bytes]]:
    """A decompression-bomb PNG and a voxel-bomb .nii.gz, made here (small files, huge when decoded)."""
    import gzip
    import io

    import nibabel
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # this process writes the bomb; the service must refuse it
    png = io.BytesIO()
    Image.new("L", (12000, 12000)).save(png, "PNG", optimize=True)
    volume = nibabel.Nifti1Image(np.zeros((512, 512, 512), np.int16), np.eye(4))
    nii = gzip.compress(volume.to_bytes(), compresslevel=9)
    return [("bomb.png", png.getvalue()), ("bomb.nii.gz", nii)]


def run_load(model: Path, scan: Path, requests: int = 300, concurrency: int = 8, hostile_every: int = 0) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # one client sends every request: the per-address rate limit would measure itself, not the service
    proc = subprocess.Popen([sys.executable, "-m", "medfedpure.cli", "serve", "--model", str(model), "--port",
                             str(port), "--rate-limit", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(url, proc)
        rss_idle = _peak_rss_mb(proc.pid)
        data = scan.read_bytes()
        bombs = hostile_uploads() if hostile_every else []
        latencies: list[float] = []
        errors: list[str] = []
        refused: list[str] = []

        def one(i: int) -> None:
            hostile = bool(hostile_every) and i % hostile_every == hostile_every - 1
            name, body = bombs[(i // hostile_every) % len(bombs)] if hostile else (scan.name, data)
            t0 = time.perf_counter()
            try:
                r = httpx.post(url + "/predict", files={"file": (name, body)}, timeout=120)
                if r.status_code != (422 if hostile else 200):
                    errors.append(f"{name}: HTTP {r.status_code}")
                elif hostile:
                    refused.append(name)
            except httpx.HTTPError as err:
                errors.append(type(err).__name__)
            if not hostile:
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(requests)))
        wall = time.perf_counter() - t0
        ms = np.array(latencies) * 1e3
        return {"measured": time.strftime("%Y-%m-%d %H:%M:%S"), "model": str(model), "scan": scan.name, "requests": requests, "concurrency": concurrency,
                "hostile_every": hostile_every, "hostile_refused": len(refused),
                "wall_s": round(wall, 2), "requests_per_s": round(requests / wall, 2),
                "bytes_per_upload": {name: len(body) for name, body in bombs} if bombs else None,
                "latency_ms": {q: round(float(np.percentile(ms, int(q[1:]))), 1) for q in ("p50", "p95", "p99")},
                "errors": len(errors), "error_kinds": sorted(set(errors)),
                "service_rss_mb": {"after_start": rss_idle, "peak": _peak_rss_mb(proc.pid)}}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="folder written by `medfedpure export`")
    parser.add_argument("--scan", required=True, type=Path, help="the scan every request uploads")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--hostile-every", type=int, default=0,
                        help="every Nth upload a decompression-bomb PNG or a voxel-bomb NIfTI (0: none)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/load.json"))
    args = parser.parse_args(argv)
    result = run_load(args.model, args.scan, args.requests, args.concurrency, args.hostile_every)
    write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
