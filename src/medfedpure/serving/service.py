"""`medfedpure serve`: one hospital's defended classifier over HTTP (FastAPI), and a page to use it.

    GET  /          the page: drop a scan, see the answer, the detector score against the
                    hospital's clean scores, the purified scan and the MAE error map
    GET  /health    {"status": "ok", ...}
    GET  /info      classes, detector, threshold, the clean calibration scores' histogram
    POST /predict   a multipart upload (`file`: JPEG/PNG/DICOM/NIfTI) -> the JSON of
                    `medfedpure predict --json`; `?views=true` adds the scan, the purified scan
                    and the error map as base64 PNGs
    POST /predict/batch   several uploads (`files`, at most MAX_BATCH) -> a list: each scan's
                    answer, or its error, in the order sent
    GET  /openapi.json, /docs, /redoc   the schema, Swagger UI and ReDoc served from this machine
                    (fastapi-offline's assets: no CDN, so they work on a closed hospital network)

Each client address may send `--rate-limit` scan requests a minute (120; 429 beyond). With a
token (`--token-file`), /info and /predict need `Authorization: Bearer <token>` (the page
asks for it once); /health and the page stay open. Off this machine (`--host` other than
loopback) a token is required and TLS (`--tls-cert`/`--tls-key`) strongly advised. With
`--audit-log FILE`, every /predict and every refused token appends one JSON line: time (UTC),
client address, file name, the upload's SHA-256 and size, the model id, the status and the answer.

The model is loaded once; requests are answered one at a time (a lock around the model), so
memory stays flat under load. An upload over the size limit, an empty one or one that is not a
single 2-D scan gets a 4xx JSON error naming the file; the service goes on serving.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
import threading
import time
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from medfedpure.data import DataError
from medfedpure.serving.predict import Predictor, png_bytes

DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_RATE_LIMIT = 120  # scan requests per client address and minute
MAX_BATCH = 32


class Audit:
    """Append-only JSON lines, one per answered or refused request (None: no log)."""

    def __init__(self, path: Path | str | None) -> None:
        self.path, self.lock = (Path(path) if path else None), threading.Lock()

    def write(self, request: Request, **fields) -> None:
        if self.path is None:
            return
        started = getattr(request.state, "started", None)
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "request_id": getattr(request.state, "request_id", None),
                 "client": request.client.host if request.client else None, "path": request.url.path,
                 "latency_ms": round(1e3 * (time.perf_counter() - started), 1) if started else None, **fields}
        with self.lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")


class RateLimit:
    """At most `per_minute` scan requests per client address in any 60 s (0: no limit)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute, self.seen, self.lock = per_minute, {}, threading.Lock()

    def allow(self, client: str) -> bool:
        if self.per_minute <= 0:
            return True
        now = time.monotonic()
        with self.lock:
            recent = [t for t in self.seen.get(client, []) if now - t < 60.0]
            if len(recent) >= self.per_minute:
                self.seen[client] = recent
                return False
            self.seen[client] = recent + [now]
            return True


def create_app(model_dir: Path | str, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, seed: int | None = None,
               token: str | None = None, audit_log: Path | str | None = None, noise_key: bytes | None = None,
               trust: Path | str | None = None, rate_limit: int = DEFAULT_RATE_LIMIT) -> FastAPI:
    """`noise_key`: the secret the purification noise of a scan is keyed with (one answer per scan);
    None draws one for this process."""
    predictor = Predictor(model_dir, seed=seed, noise_key=noise_key or os.urandom(32), trust=trust)
    audit = Audit(audit_log)
    limiter = RateLimit(rate_limit)
    model_id = predictor.bundle.model_id
    limit = int(max_upload_mb * 1024 * 1024)
    page = (resources.files("medfedpure.serving") / "static" / "index.html").read_text()
    app = FastAPI(title="MedFedPure", version="1", docs_url=None, redoc_url=None,
                  description="One hospital's defended brain-MRI classifier: detector, purifier, personalized MoE.")

    @app.exception_handler(HTTPException)
    async def _error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's own 422s in the service's one shape: {"error": one line naming the field}."""
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        return JSONResponse({"error": f"{field or 'request'}: {first.get('msg', 'invalid request')}"}, status_code=422)

    @app.middleware("http")
    async def _authenticate(request: Request, call_next):
        request.state.request_id, request.state.started = os.urandom(8).hex(), time.perf_counter()
        if token is not None and request.url.path not in ("/", "/health", "/docs", "/redoc", "/openapi.json") \
                and not request.url.path.startswith("/docs-assets/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                audit.write(request, status=401, model_id=model_id)
                return JSONResponse({"error": "missing or wrong token (send Authorization: Bearer <token>)"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if request.url.path.startswith("/predict") and not limiter.allow(request.client.host if request.client else ""):
            audit.write(request, status=429, model_id=model_id)
            return JSONResponse({"error": f"more than {limiter.per_minute} scan requests a minute from this address"},
                                status_code=429, headers={"Retry-After": "60"})
        response = await call_next(request)
        response.headers["X-Request-Id"] = request.state.request_id  # the audit log's line for this answer
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    assets = resources.files("fastapi_offline") / "static"  # Swagger UI's and ReDoc's scripts, no CDN
    app.mount("/docs-assets", StaticFiles(directory=str(assets)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="MedFedPure API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css", swagger_favicon_url="")

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title="MedFedPure API", with_google_fonts=False,
                              redoc_js_url="/docs-assets/redoc.standalone.js", redoc_favicon_url="")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model_id": predictor.bundle.model_id, "client": predictor.bundle.manifest["client"],
                "classes": predictor.bundle.classes}

    @app.get("/info")
    def info() -> dict:
        return predictor.info()

    async def answer_one(request: Request, file: UploadFile, views: bool, nifti_slice: int | None) -> dict:
        """One upload's answer (a dict), or an HTTPException naming it; audited either way."""
        data = await file.read(limit + 1)
        name = file.filename or "upload"
        upload = {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "model_id": model_id}
        try:
            if len(data) > limit:
                raise HTTPException(413, f"'{name}' is larger than the limit of {max_upload_mb:g} MB")
            if not data:
                raise HTTPException(400, f"'{name}' is empty")
            try:
                answer = await run_in_threadpool(predictor.predict_file, data, name, nifti_slice, views)
            except (DataError, ValueError, OSError) as err:  # not a scan this service can read: the sender's error
                raise HTTPException(422, str(err).splitlines()[0] if str(err) else f"'{name}' cannot be read") from err
        except HTTPException as err:
            audit.write(request, status=err.status_code, error=err.detail, **upload)
            raise
        report = dict(answer.report)
        audit.write(request, status=200, **upload, label=report["label"], probability=report["probability"],
                    flagged=report["flagged"], score=report["score"], t_star=report["t_star"],
                    agreement=report["agreement"])
        if views:
            report["views"] = {"scan": _b64(png_bytes(answer.scan)), "purified": _b64(png_bytes(answer.purified)),
                               "mae_error": _b64(png_bytes(answer.error_map, colormap="magma"))}
        return report

    def too_large(request: Request, allowed: int) -> None:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > allowed + 64 * 1024:
            raise HTTPException(413, f"upload larger than the limit of {max_upload_mb:g} MB a scan")

    @app.post("/predict")
    async def predict(request: Request, file: UploadFile = File(...), views: bool = False,
                      nifti_slice: int | None = None) -> dict:
        too_large(request, limit)
        return await answer_one(request, file, views, nifti_slice)

    @app.post("/predict/batch")
    async def predict_batch(request: Request, files: list[UploadFile] = File(...),
                            nifti_slice: int | None = None) -> list[dict]:
        too_large(request, limit * MAX_BATCH)
        if len(files) > MAX_BATCH:
            raise HTTPException(413, f"{len(files)} scans in one batch; at most {MAX_BATCH}")
        out = []
        for file in files:  # each answered or refused on its own; one bad scan does not sink the batch
            try:
                out.append(await answer_one(request, file, False, nifti_slice))
            except HTTPException as err:
                out.append({"file": file.filename or "upload", "error": err.detail, "status": err.status_code})
        return out

    return app


def _b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def read_token(path: Path | str | None) -> str | None:
    """The access token in a file (its first line), or None without a file; one clear error otherwise."""
    if path is None:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip().splitlines()[0].strip()
    except (OSError, UnicodeDecodeError, IndexError) as err:
        raise ValueError(f"--token-file '{path}' cannot be read or is empty ({err})") from err
    if len(token) < 16:
        raise ValueError(f"--token-file '{path}': the token must have at least 16 characters")
    return token


def check_exposure(host: str, token: str | None, tls: bool) -> str | None:
    """Refuse a service reachable from other machines without a token; a warning without TLS."""
    if loopback(host):
        return None
    if token is None:
        raise ValueError(f"--host {host} makes the model reachable from other machines: give --token-file (and "
                         "--tls-cert/--tls-key), or keep the default 127.0.0.1")
    return None if tls else (f"warning: --host {host} without TLS: the token and the scans cross the network in "
                             "clear text (give --tls-cert and --tls-key)")


def serve(model_dir: Path | str, host: str = "127.0.0.1", port: int = 8000,
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, token: str | None = None,
          tls: tuple[str, str] | None = None, audit_log: Path | str | None = None, noise_key: bytes | None = None,
          trust: Path | str | None = None, rate_limit: int = DEFAULT_RATE_LIMIT) -> None:
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    logging = json.loads(json.dumps(LOGGING_CONFIG))  # uvicorn's, with a timestamp on every line
    for formatter in logging["formatters"].values():
        formatter["fmt"] = "%(asctime)s " + formatter["fmt"]
    options = {"ssl_certfile": tls[0], "ssl_keyfile": tls[1]} if tls else {}
    app = create_app(model_dir, max_upload_mb, token=token, audit_log=audit_log, noise_key=noise_key, trust=trust,
                     rate_limit=rate_limit)
    uvicorn.run(app, host=host, port=port, log_level="info", log_config=logging, **options)
