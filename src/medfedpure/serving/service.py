"""`medfedpure serve`: one hospital's defended classifier over HTTP (FastAPI), and a page to use it.

    GET  /          the page: drop a scan, see the answer, the detector score against the
                    hospital's clean scores, the purified scan and the MAE error map
    GET  /health    {"status": "ok", ...}
    GET  /info      classes, detector, threshold, the clean calibration scores' histogram
    POST /predict   a multipart upload (`file`: JPEG/PNG/DICOM/NIfTI) -> the JSON of
                    `medfedpure predict --json`; `?views=true` adds the scan, the purified scan
                    and the error map as base64 PNGs
    GET  /openapi.json   the schema (no /docs page: Swagger UI would come from a CDN, which a
                    hospital network may not reach, and show a blank page)

The model is loaded once; requests are answered one at a time (a lock around the model), so
memory stays flat under load. An upload over the size limit, an empty one or one that is not a
single 2-D scan gets a 4xx JSON error naming the file; the service goes on serving.
"""

from __future__ import annotations

import base64
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

from medfedpure.data import DataError
from medfedpure.serving.predict import Predictor, png_bytes

DEFAULT_MAX_UPLOAD_MB = 20.0


def create_app(model_dir: Path | str, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, seed: int | None = None) -> FastAPI:
    predictor = Predictor(model_dir, seed=seed)
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

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model_id": predictor.bundle.model_id, "client": predictor.bundle.manifest["client"],
                "classes": predictor.bundle.classes}

    @app.get("/info")
    def info() -> dict:
        return predictor.info()

    @app.post("/predict")
    async def predict(request: Request, file: UploadFile = File(...), views: bool = False,
                      nifti_slice: int | None = None) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit + 64 * 1024:
            raise HTTPException(413, f"upload larger than the limit of {max_upload_mb:g} MB")
        data = await file.read(limit + 1)
        name = file.filename or "upload"
        if len(data) > limit:
            raise HTTPException(413, f"'{name}' is larger than the limit of {max_upload_mb:g} MB")
        if not data:
            raise HTTPException(400, f"'{name}' is empty")
        try:
            answer = await run_in_threadpool(predictor.predict_file, data, name, nifti_slice, views)
        except (DataError, ValueError, OSError) as err:  # not a scan this service can read: the sender's error
            raise HTTPException(422, str(err).splitlines()[0] if str(err) else f"'{name}' cannot be read") from err
        report = dict(answer.report)
        if views:
            report["views"] = {"scan": _b64(png_bytes(answer.scan)), "purified": _b64(png_bytes(answer.purified)),
                               "mae_error": _b64(png_bytes(answer.error_map, colormap="magma"))}
        return report

    return app


def _b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def serve(model_dir: Path | str, host: str = "127.0.0.1", port: int = 8000,
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB) -> None:
    import uvicorn

    uvicorn.run(create_app(model_dir, max_upload_mb), host=host, port=port, log_level="info")
