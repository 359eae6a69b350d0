"""export -> predict -> serve on a run folder with untrained weights (the pipeline, not the accuracy)."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from medfedpure.cli import main
from medfedpure.defense.trainer import build_diffusion, build_mae
from medfedpure.methods import new_model
from medfedpure.runfolder import client_dir
from medfedpure.serving.bundle import BundleError, export_bundle, load_bundle
from medfedpure.serving.predict import Predictor
from medfedpure.serving.service import create_app
from medfedpure.storage import read_json, save_tensors, write_json

from conftest import demo


def make_run(folder: Path, clients: int = 2) -> Path:
    """A run folder as `experiment` leaves it, with untrained weights (demo sizes)."""
    cfg = demo(f"data.num_clients={clients}").validate()
    write_json(folder / "config.json", cfg.to_dict())
    write_json(folder / "partition.json", {"classes": ["healthy", "tumor"], "clients": []})
    write_json(folder / "environment.json", {"git_commit": "abc123"})
    model = new_model(cfg, 2, init_seed=0)
    save_tensors(folder / "global_experts.safetensors", model.expert_state())
    save_tensors(folder / "mae.safetensors", build_mae(cfg).state_dict())
    save_tensors(folder / "diffusion.safetensors", build_diffusion(cfg).state_dict())
    for i in range(clients):
        gate = new_model(cfg, 2, init_seed=i + 1).gate_state()
        save_tensors(client_dir(folder, i) / "gate.safetensors", gate, {"round": "5"})
        save_tensors(client_dir(folder, i) / "detector_calibration.safetensors",
                     {cfg.defense.detector: torch.linspace(0.0, 0.2, 50)})
    return folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serving")
    return export_bundle(make_run(root / "run"), 1, root / "model")


def scan_png(seed: int = 0, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def test_export_writes_weights_and_manifest_and_loads_back(bundle):
    manifest = read_json(bundle / "manifest.json")
    assert manifest["format"] == "medfedpure-model" and manifest["client"] == 1
    assert manifest["classes"] == ["healthy", "tumor"] and manifest["image_size"] == 32
    assert manifest["run"]["commit"] == "abc123" and manifest["threshold"] is not None
    # MONAI bundle-style metadata: the data format, the intended use, the run's strongest-attack figure
    fmt = manifest["network_data_format"]
    assert fmt["inputs"]["image"]["spatial_shape"] == [32, 32] and fmt["inputs"]["image"]["value_range"] == [0, 1]
    assert fmt["outputs"]["pred"]["channel_def"] == {"0": "healthy", "1": "tumor"}
    assert "not a medical device" in manifest["intended_use"] and manifest["run"]["adaptive_headline"] is None
    loaded = load_bundle(bundle)
    gate_1 = new_model(loaded.cfg, 2, init_seed=2).gate_state()  # client 1's gate, not client 0's
    for k, v in gate_1.items():
        assert torch.equal(loaded.defended.classifier.state_dict()[k], v)


def test_a_damaged_or_foreign_bundle_is_refused_in_one_line(bundle, tmp_path):
    from medfedpure.serving.bundle import bundle_digest
    from medfedpure.storage import load_tensors

    copy = tmp_path / "copy"
    copy.mkdir()
    weights = (bundle / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(weights)
    manifest = read_json(bundle / "manifest.json")

    def refused(edited: dict, match: str, resign: bool = False) -> None:
        """`resign`: with the digest recomputed, as a faulty exporter (not a hand edit) would leave it."""
        digest = bundle_digest((copy / "model.safetensors").read_bytes(), edited)
        body = {**edited, "digest": digest} if resign else edited
        write_json(copy / "manifest.json", body)
        with pytest.raises(BundleError, match=match):
            load_bundle(copy)

    refused({**manifest, "version": 99}, "version 99")
    # any edit after export: the digest of weights and manifest no longer matches
    for edit in ({"classes": manifest["classes"][::-1]}, {"tau": 0.0}, {"image_size": 64}, {"mode": "off"},
                 {"detector": "mae"}):
        refused({**manifest, **edit}, "changed after export")
    key = next(iter(manifest["tensors"]))
    refused({**manifest, "tensors": {**manifest["tensors"], key: [7, 7]}}, "does not match its manifest", resign=True)
    for field in ("tau", "classes", "seed", "config", "image_size"):
        refused({k: v for k, v in manifest.items() if k != field}, f"field\\(s\\) {field}", resign=True)
    write_json(copy / "manifest.json", [manifest])
    with pytest.raises(BundleError, match="not a manifest"):
        load_bundle(copy)
    tensors = load_tensors(bundle / "model.safetensors")
    tensors[key] = torch.full_like(tensors[key], float("nan")) if tensors[key].is_floating_point() else tensors[key]
    save_tensors(copy / "model.safetensors", tensors)  # another file of the same shapes: NaN weights
    refused(manifest, "changed after export")
    refused(manifest, "NaN or infinite", resign=True)
    with pytest.raises(BundleError, match="manifest.json' is missing"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="not empty"):
        export_bundle(bundle.parent / "run", 0, bundle)
    assert len(load_bundle(bundle).model_id) == 16


def test_predict_reports_label_score_percentile_flag_and_depth(bundle):
    predictor = Predictor(bundle)
    answer = predictor.predict_file(scan_png(), "scan.png", views=True)
    r = answer.report
    assert r["label"] in ("healthy", "tumor") and 0.5 <= r["probability"] <= 1
    assert abs(sum(r["probabilities"].values()) - 1) < 1e-6
    calibration = np.linspace(0.0, 0.2, 50)
    assert r["score_percentile"] == pytest.approx(100 * np.mean(calibration <= r["score"]), abs=0.01)
    assert r["flagged"] == (r["score"] > r["threshold"])
    assert (r["t_star"] > 0) == r["flagged"]  # selective mode: only flagged scans are purified
    assert answer.purified.shape == (32, 32, 3) and answer.error_map.shape == (32, 32)
    again = Predictor(bundle).predict_file(scan_png(), "scan.png").report
    assert again == r  # the same process order and seed give the same answer
    assert r["model_id"] == predictor.info()["model_id"] == load_bundle(bundle).model_id  # which model answered


def test_predict_command_prints_json_and_saves_views(bundle, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(2):
        (scans / f"s{i}.png").write_bytes(scan_png(i))
    assert main(["predict", "--model", str(bundle), str(scans), "--json", "--save-views", str(tmp_path / "v"),
                 "--no-progress"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [Path(r["file"]).name for r in reports] == ["s0.png", "s1.png"]
    assert all(Path(p).is_file() for r in reports for p in r["views"].values())
    assert main(["predict", "--model", str(bundle), str(tmp_path / "nothing-here")]) == 2
    assert "nothing-here" in capsys.readouterr().err
    # scans of the same name in two folders keep their own views; a DICOM without a suffix is found by its preamble
    (scans / "sub").mkdir()
    (scans / "sub" / "s0.png").write_bytes(scan_png(5))
    assert main(["predict", "--model", str(bundle), str(scans), "--json", "--save-views", str(tmp_path / "w"),
                 "--no-progress"]) == 0
    views = [r["views"] for r in json.loads(capsys.readouterr().out)]
    assert len({v["scan"] for v in views}) == 3 and all(Path(v["scan"]).is_file() for v in views)
    shutil.rmtree(scans / "sub")
    # a folder with one unreadable scan: every other one answered, the bad one reported beside them, rc 1
    (scans / "broken.png").write_bytes(b"not a png")
    assert main(["predict", "--model", str(bundle), str(scans), "--json", "--no-progress"]) == 1
    captured = capsys.readouterr()
    reports = json.loads(captured.out)
    assert [Path(r["file"]).name for r in reports] == ["broken.png", "s0.png", "s1.png"]
    assert "broken.png" in reports[0]["error"] and all("label" in r for r in reports[1:])
    assert "1 of 3 scan(s) could not be answered" in captured.err


def test_http_service_answers_every_endpoint_and_refuses_bad_uploads(bundle):
    key = b"a test key of the service noise"
    client = TestClient(create_app(bundle, max_upload_mb=0.05, noise_key=key))
    assert client.get("/health").json()["status"] == "ok"
    assert "MedFedPure" in client.get("/").text and "<script src=\"http" not in client.get("/").text
    info = client.get("/info").json()
    assert info["classes"] == ["healthy", "tumor"] and sum(info["calibration"]["histogram"]) == 50
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    ok = client.post("/predict?views=true", files={"file": ("scan.png", scan_png(), "image/png")})
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["label"] in ("healthy", "tumor") and body["views"]["purified"].startswith("data:image/png;base64,")
    same = Predictor(bundle, noise_key=key).predict_file(scan_png(), "scan.png").report
    assert {k: v for k, v in body.items() if k != "views"} == same  # the JSON of `predict --json`
    # one answer per scan: the same scan sent again, after others, gets the very same answer
    client.post("/predict", files={"file": ("other.png", scan_png(7), "image/png")})
    again = [client.post("/predict", files={"file": ("scan.png", scan_png(), "image/png")}).json() for _ in range(3)]
    assert all(a == {k: v for k, v in body.items() if k != "views"} for a in again)
    bad = [("notes.png", b"this is not an image", 422), ("empty.png", b"", 400),
           ("scan.dcm", b"DICM" * 10, 422), ("big.png", b"\0" * 80_000, 413)]
    for name, data, status in bad:
        r = client.post("/predict", files={"file": (name, data, "application/octet-stream")})
        assert r.status_code == status, (name, r.text)
        assert name in r.json()["error"] or status == 413
    missing = client.post("/predict")  # no file at all: FastAPI's own 422, in the service's shape
    assert missing.status_code == 422 and missing.json() == {"error": "file: Field required"}
    wrong = client.post("/predict?nifti_slice=x", files={"file": ("scan.png", scan_png(), "image/png")})
    assert wrong.status_code == 422 and wrong.json()["error"].startswith("nifti_slice:")
    docs = client.get("/docs")  # Swagger UI from this machine: no CDN a hospital network may not reach
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text and "cdn" not in docs.text
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    redoc = client.get("/redoc")  # ReDoc too, with no Google fonts either
    assert redoc.status_code == 200 and "/docs-assets/redoc.standalone.js" in redoc.text
    assert "cdn" not in redoc.text and "fonts.googleapis" not in redoc.text
    assert client.get("/docs-assets/redoc.standalone.js").status_code == 200
    # a batch: every scan answered or refused on its own, in the order sent
    batch = client.post("/predict/batch", files=[("files", ("a.png", scan_png(), "image/png")),
                                                 ("files", ("bad.png", b"junk", "image/png")),
                                                 ("files", ("b.png", scan_png(2), "image/png"))])
    assert batch.status_code == 200, batch.text
    a, bad_one, b = batch.json()
    assert a == {**same, "file": "a.png"} and b["file"] == "b.png" and "label" in b
    assert bad_one["status"] == 422 and "bad.png" in bad_one["error"] and "BytesIO" not in bad_one["error"]
    many = [("files", (f"{i}.png", scan_png(i), "image/png")) for i in range(33)]
    assert client.post("/predict/batch", files=many).status_code == 413
    assert client.get("/health").json()["model_id"] == info["model_id"]
    assert client.post("/predict", files={"file": ("scan.png", scan_png(1), "image/png")}).status_code == 200


def test_a_scan_far_from_the_hospitals_own_says_why_and_asks_for_review(bundle, tmp_path):
    """The bundle keeps the range of its hospital's own scans (mean, spread, color); a scan of that
    hospital passes, a color photo and a flat grey image are out of its domain."""
    from medfedpure.methods import task

    loaded = load_bundle(bundle)
    domain = loaded.manifest["domain"]
    assert domain["n"] > 0 and domain["mean"][0] < domain["mean"][1]
    own = torch.cat([b[0] for b in task.validation_loader(loaded.cfg, 1)])[0]
    Image.fromarray((own * 255).round().byte().permute(1, 2, 0).numpy()).save(tmp_path / "own.png")
    predictor = Predictor(bundle)
    assert predictor.predict_file(tmp_path / "own.png").report["out_of_domain"] == []
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    photo = predictor.predict_file(tmp_path / "photo.png").report
    assert any(reason.startswith("color") for reason in photo["out_of_domain"]) and photo["review"]
    flat = np.full((32, 32), 250, np.uint8)
    flat[0, 0] = 0
    Image.fromarray(flat).save(tmp_path / "flat.png")
    reasons = predictor.predict_file(tmp_path / "flat.png").report["out_of_domain"]
    assert any(r.startswith("mean intensity") for r in reasons)
    # the demo hospital's scans are 32 pixels a side: the same scan at 8x that size is far from them
    assert domain["side"] == [32, 32]
    Image.open(tmp_path / "own.png").resize((256, 256)).save(tmp_path / "big.png")
    big = predictor.predict_file(tmp_path / "big.png").report
    assert big["out_of_domain"] == ["size 256 x 256 pixels, far from the hospital's scans (32 to 32 pixels a side)"]
    assert big["review"]


def test_one_answer_per_scan_the_noise_keyed_on_its_pixels(bundle):
    """Graded mode purifies every scan: the same scan gets the same purification (and answer) on
    every submission, whatever came between; another key, or another scan, other noise."""
    import dataclasses

    def graded(key):
        p = Predictor(bundle, noise_key=key)
        p.defended.defense = dataclasses.replace(p.defended.defense, mode="graded")
        return p

    one, other = graded(b"k" * 32), graded(b"q" * 32)
    first = one.predict_file(scan_png(), "scan.png")
    one.predict_file(scan_png(3), "b.png")
    again = one.predict_file(scan_png(), "scan.png")
    assert first.report["t_star"] > 0 and np.array_equal(first.purified, again.purified)
    assert first.report == again.report
    # how stable: the share of 1 + 4 purifications that agree with the answer, below 0.8 for review
    r = first.report
    assert r["draws"] == 5 and r["agreement"] in (0.2, 0.4, 0.6, 0.8, 1.0)
    assert r["review"] == (r["agreement"] < 0.8 or bool(r["out_of_domain"]))
    labels = {one.predict_file(scan_png(s), f"{s}.png").report["agreement"] for s in range(6)}
    assert labels <= {0.2, 0.4, 0.6, 0.8, 1.0}
    quiet = Predictor(bundle, stability_draws=0).predict_file(scan_png(), "scan.png").report
    assert quiet["draws"] == 1 and quiet["agreement"] == 1.0 and quiet["review"] == bool(quiet["out_of_domain"])
    assert not np.array_equal(first.purified, other.predict_file(scan_png(), "scan.png").purified)


def test_a_token_guards_info_and_predict_and_every_request_is_audited(bundle, tmp_path):
    from medfedpure.serving.service import check_exposure, read_token

    token = "s3cret-token-of-the-hospital"
    audit = tmp_path / "audit.jsonl"
    client = TestClient(create_app(bundle, token=token, audit_log=audit))
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200  # open
    upload = {"file": ("scan.png", scan_png(), "image/png")}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
        r = client.post("/predict", files=upload, headers=headers)
        assert r.status_code == 401 and "token" in r.json()["error"]
    assert client.get("/info").status_code == 401
    auth = {"Authorization": f"Bearer {token}"}
    assert client.get("/info", headers=auth).status_code == 200
    ok = client.post("/predict", files=upload, headers=auth)
    bad = client.post("/predict", files={"file": ("notes.png", b"not an image", "image/png")}, headers=auth)
    assert ok.status_code == 200 and bad.status_code == 422
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [e["status"] for e in lines] == [401, 401, 401, 401, 200, 422]
    answered = lines[4]
    assert answered["file"] == "scan.png" and answered["label"] == ok.json()["label"]
    assert answered["sha256"] == hashlib.sha256(scan_png()).hexdigest()
    assert answered["model_id"] == ok.json()["model_id"]
    assert answered["time"].endswith("Z") and "client" in answered and "notes.png" in lines[5]["error"]
    assert answered["request_id"] == ok.headers["X-Request-Id"] and answered["latency_ms"] > 0
    assert answered["agreement"] == ok.json()["agreement"]
    # off this machine a token is required, and TLS advised
    assert check_exposure("127.0.0.1", None, False) is None and check_exposure("localhost", None, False) is None
    with pytest.raises(ValueError, match="--token-file"):
        check_exposure("0.0.0.0", None, True)
    assert "without TLS" in check_exposure("10.0.0.5", token, False) and check_exposure("10.0.0.5", token, True) is None
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ValueError, match="16 characters"):
        read_token(tmp_path / "short")
    (tmp_path / "token").write_text(token + "\n")
    assert read_token(tmp_path / "token") == token
    assert main(["serve", "--model", str(bundle), "--host", "0.0.0.0"]) == 2  # refused before it listens
    assert main(["serve", "--model", str(bundle), "--tls-cert", "c.pem"]) == 2  # a certificate without its key


@pytest.fixture
def served(bundle):
    yield from _serve(Path(os.environ.get("MEDFEDPURE_SERVE_MODEL") or bundle))


def _serve(model: Path):
    """`medfedpure serve` in its own process on a free port; stopped by its pid."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "medfedpure.cli", "serve", "--model", str(model), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"serve did not start: {proc.stdout.read().decode()[-2000:]}")
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine: `apt-get install -y chromium` (the README's "
                                              "test command installs it; Playwright's own browser download is not used)")
def test_the_page_in_a_real_browser_classifies_an_uploaded_scan(served, tmp_path):
    """Chromium opens the page, uploads a scan, reads the answer and sees the three images.
    MEDFEDPURE_SERVE_MODEL / MEDFEDPURE_SERVE_SCAN / MEDFEDPURE_SCREENSHOT: another model, scan and
    screenshot path (docs/serve-page.png is made this way from the Br35H run, see docs/results.md)."""
    from playwright.sync_api import sync_playwright

    scan = Path(os.environ.get("MEDFEDPURE_SERVE_SCAN") or tmp_path / "scan.png")
    if not scan.exists():
        scan.write_bytes(scan_png(3))
    not_a_scan = tmp_path / "notes.png"
    not_a_scan.write_text("not an image")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 860})
            page.goto(served)
            page.wait_for_function("document.getElementById('model').textContent.includes('hospital')")
            assert not page.is_visible("#results")  # no empty answer card or broken images before an upload
            page.set_input_files("#file", str(scan))
            page.wait_for_selector("#results:not([hidden])", timeout=60_000)
            assert "purification(s) agree" in page.text_content("[data-testid=agreement]")
            page.set_input_files("#file", str(not_a_scan))
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            error = page.text_content("#error")
            assert "notes.png" in error and "BytesIO" not in error
            assert not page.is_visible("#results")  # the previous scan's answer is not left under the error
            page.set_input_files("#file", str(scan))
            page.wait_for_selector("#results:not([hidden])", timeout=60_000)
            page.wait_for_function("document.getElementById('error').textContent === ''")
            label = page.text_content("[data-testid=label]")
            classes = json.loads(page.evaluate("fetch('/info').then(r => r.text())"))["classes"]
            assert label in classes
            assert page.text_content("[data-testid=probability]").endswith("%")
            for image in ("scan", "purified", "maeerror"):
                page.wait_for_function(f"document.getElementById('{image}').naturalWidth > 0")
            detector = json.loads(page.evaluate("fetch('/info').then(r => r.text())"))["detector"]
            caption = page.text_content("#maecaption")
            assert caption == "MAE error map" if detector == "mae" else f"the {detector} detector" in caption
            shot = Path(os.environ.get("MEDFEDPURE_SCREENSHOT") or tmp_path / "page.png")
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()


BR35H_YES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "br35h" / "yes"


@pytest.mark.skipif(not BR35H_YES.is_dir(), reason=f"Br35H scans not found at {BR35H_YES}")
def test_a_br35h_scan_as_png_dicom_and_nifti_gets_the_same_answer(bundle, tmp_path, capsys):
    from test_scans import write_dicom, write_nifti

    source = sorted(BR35H_YES.iterdir())[0]
    pixels = np.asarray(Image.open(source).convert("L"), dtype=np.float64)
    png = np.round(255 * (pixels - pixels.min()) / (pixels.max() - pixels.min())).astype(np.uint8)  # full range
    Image.fromarray(png).save(tmp_path / "scan.png")
    write_dicom(tmp_path / "scan.dcm", png.astype(np.uint16) * 257)
    write_nifti(tmp_path / "scan.nii.gz", np.rot90(png, k=-1).astype(np.int16))
    model = os.environ.get("MEDFEDPURE_SERVE_MODEL") or str(bundle)  # e.g. an exported Br35H model
    answers = []
    for name in ("scan.png", "scan.dcm", "scan.nii.gz"):
        assert main(["predict", "--model", model, str(tmp_path / name), "--json", "--seed", "7"]) == 0
        answers.append(json.loads(capsys.readouterr().out))
    with capsys.disabled():
        print("".join(f"\n{Path(a['file']).name}: {a['label']} p={a['probability']:.4f} score={a['score']:.6g} "
                      f"flagged={a['flagged']} t*={a['t_star']}" for a in answers))
    for other in answers[1:]:
        assert other["label"] == answers[0]["label"] and other["flagged"] == answers[0]["flagged"]
        assert other["score"] == pytest.approx(answers[0]["score"], rel=1e-4, abs=1e-9)


def test_load_benchmark_300_requests_at_concurrency_8_without_errors(bundle, tmp_path):
    scan = tmp_path / "scan.png"
    scan.write_bytes(scan_png(5))
    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "load.py"),
                           "--model", str(bundle), "--scan", str(scan), "--requests", "300", "--concurrency", "8",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-1500:]
    result = json.loads(out.read_text())
    assert result["requests"] == 300 and result["errors"] == 0 and result["requests_per_s"] > 0
    assert result["latency_ms"]["p50"] <= result["latency_ms"]["p95"] <= result["latency_ms"]["p99"]
    assert result["service_rss_mb"]["peak"] > 0
    # hostile uploads among them (a decompression-bomb PNG, a voxel-bomb NIfTI) at concurrency 10: each refused,
    # every scan still answered, and the service's memory stays within 300 MB of what it holds at start
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "load.py"),
                           "--model", str(bundle), "--scan", str(scan), "--requests", "20", "--concurrency", "10",
                           "--hostile-every", "4", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-1500:]
    hostile = json.loads(out.read_text())
    assert hostile["hostile_refused"] == 5 and hostile["errors"] == 0
    assert hostile["service_rss_mb"]["peak"] - hostile["service_rss_mb"]["after_start"] < 300


@pytest.mark.skipif(not BR35H_YES.is_dir(), reason=f"Br35H scans not found at {BR35H_YES}")
def test_the_channels_last_layout_gives_the_same_answers_on_br35h_scans(bundle):
    """predict/serve's channels-last layout against the default one, scan by scan (with
    MEDFEDPURE_SERVE_MODEL: a trained model; it prints how many answers agree)."""
    model = os.environ.get("MEDFEDPURE_SERVE_MODEL") or bundle
    scans = sorted(BR35H_YES.iterdir())[:int(os.environ.get("MEDFEDPURE_LAYOUT_SCANS", "20"))]
    fast, plain = Predictor(model, seed=1), Predictor(model, seed=1, fast_layout=False)
    same, worst = 0, 0.0
    for path in scans:
        a, b = fast.predict_file(path).report, plain.predict_file(path).report
        worst = max(worst, abs(a["score"] - b["score"]) / max(abs(b["score"]), 1e-12))
        same += (a["label"], a["flagged"], a["t_star"]) == (b["label"], b["flagged"], b["t_star"])
    print(f"\nchannels-last vs default layout: {same} of {len(scans)} scans get the same label, flag and t*; "
          f"largest relative score difference {worst:.2g}")
    assert same >= len(scans) - max(1, len(scans) // 50)


def test_a_signed_bundle_is_trusted_only_with_its_key(bundle, tmp_path, capsys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    def keypair(name):
        key = Ed25519PrivateKey.generate()
        (tmp_path / f"{name}.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (tmp_path / f"{name}.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    keypair("hospital")
    keypair("someone-else")
    signed = tmp_path / "signed"
    assert main(["export", "--run", str(bundle.parent / "run"), "--client", "1", "--out", str(signed),
                 "--sign-key", str(tmp_path / "hospital.pem")]) == 0
    assert "signature.ed25519" in capsys.readouterr().out and (signed / "signature.ed25519").is_file()
    assert load_bundle(signed, trust=tmp_path / "hospital.pub").model_id == load_bundle(signed).model_id
    with pytest.raises(BundleError, match="does not verify"):
        load_bundle(signed, trust=tmp_path / "someone-else.pub")
    with pytest.raises(BundleError, match="not signed"):
        load_bundle(bundle, trust=tmp_path / "hospital.pub")
    scan = tmp_path / "scan.png"
    scan.write_bytes(scan_png())
    assert main(["predict", "--model", str(signed), "--trust", str(tmp_path / "hospital.pub"), str(scan)]) == 0
    assert main(["predict", "--model", str(signed), "--trust", str(tmp_path / "someone-else.pub"), str(scan)]) == 2
    assert "does not verify" in capsys.readouterr().err
    assert main(["export", "--run", str(bundle.parent / "run"), "--client", "1", "--out", str(tmp_path / "x"),
                 "--sign-key", str(tmp_path / "hospital.pub")]) == 2  # a public key cannot sign
    assert not (tmp_path / "x").exists()


def test_https_with_a_token_end_to_end(bundle, tmp_path):
    """`serve` over TLS with `medfedpure certs`' server certificate, a token and an audit log, in its
    own process: the CA verifies it, a request without the token is refused, one with it answered."""
    import socket
    import time

    import httpx

    from medfedpure.federation.certificates import make_local_certificates

    certs = tmp_path / "certs"
    make_local_certificates(certs, 1)
    (tmp_path / "token").write_text("token-of-hospital-one-16+\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "medfedpure.cli", "serve", "--model", str(bundle), "--port", str(port),
               "--token-file", str(tmp_path / "token"), "--tls-cert", str(certs / "server.pem"),
               "--tls-key", str(certs / "server.key"), "--audit-log", str(tmp_path / "audit.jsonl")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"https://127.0.0.1:{port}"
    try:
        with httpx.Client(verify=str(certs / "ca.crt"), timeout=10) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    assert client.get(url + "/health").status_code == 200
                    break
                except httpx.HTTPError:
                    assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-2000:]
                    time.sleep(0.3)
            upload = {"file": ("scan.png", scan_png(), "image/png")}
            assert client.post(url + "/predict", files=upload).status_code == 401
            auth = {"Authorization": "Bearer token-of-hospital-one-16+"}
            assert client.post(url + "/predict", files=upload, headers=auth).json()["label"] in ("healthy", "tumor")
        with pytest.raises(httpx.TransportError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert [json.loads(line)["status"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()] == [401, 200]


def test_a_client_sending_too_fast_is_told_to_wait(bundle, tmp_path):
    audit = tmp_path / "audit.jsonl"
    client = TestClient(create_app(bundle, rate_limit=3, audit_log=audit))
    upload = {"file": ("scan.png", scan_png(), "image/png")}
    codes = [client.post("/predict", files=upload).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    assert client.get("/health").status_code == 200 and client.get("/info").status_code == 200  # not scans
    refused = client.post("/predict", files=upload)
    assert refused.json()["error"].startswith("more than 3 scan requests") and refused.headers["Retry-After"] == "60"
    assert [json.loads(line)["status"] for line in audit.read_text().splitlines()] == [200, 200, 200, 429, 429]


def test_the_domain_benchmark_counts_what_falls_outside_the_hospitals_scans(bundle, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):  # saturated color: never the grey scans the demo hospital trained on
        Image.fromarray(np.tile(np.array([255, 0, 0], np.uint8), (32, 32, 1))).save(photos / f"red{i}.png")
    out = tmp_path / "domain.json"
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "domain.py"),
                           "--model", str(bundle), "--scans", f"photos={photos}", "--synthetic", "6",
                           "--per-folder", "5", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-1500:]
    folders = json.loads(out.read_text())["folders"]
    assert folders["photos"]["scans"] == 3 and folders["photos"]["out_of_domain"] == 3
    assert folders["photos"]["by_reason"].get("color") == 3
    assert folders["synthetic"]["scans"] == 5  # the hospital's own kind of scan: rarely outside
    assert folders["synthetic"]["out_of_domain"] <= 1
