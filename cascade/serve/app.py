"""The web service: ``create_app(model_dir)`` → a FastAPI (ASGI) app with the REST API, the page and the metrics.

The model loads in the background when the app starts (``/healthz`` and the API answer 503 until it is loaded and a
warm-up forward has run). A request's body is read with a size limit while it streams, decoded in a thread pool,
predicted in a micro-batch (:mod:`cascade.serve.batching`) on the inference thread, and its answer (JSON, DICOM
SEG or PNG overlay) is encoded in the pool again, so the event loop never blocks. Uploads stay in memory.

Each request logs one line: method, route, status, bytes in and out, milliseconds and a short hash of the image's
ImageId; never a header value or an identifier.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from cascade import __version__
from cascade.errors import CascadeError, ConfigError
from cascade.serve.auth import authorized
from cascade.serve.batching import Answer, MicroBatcher
from cascade.serve.metrics import Metrics
from cascade.serve.uploads import HTTPProblem, read_upload

log = logging.getLogger("cascade.serve")

FORMATS = ("json", "seg", "png")
STATIC = Path(__file__).resolve().parent / "static"
PROTECTED = ("/v1/", "/metrics")
"""Path prefixes that need the bearer token when the service has one (the page, /healthz and /docs do not)."""


@dataclass
class _State:
    """What the app holds between requests."""

    model_dir: Path
    device: str
    limit: int
    token: str | None
    speed: dict[str, Any] = field(default_factory=dict)
    """precision, backend, compile, cache_dir: how the networks run (``Cascade.from_pretrained``'s arguments)."""
    metrics: Metrics = field(default_factory=Metrics)
    model: Any = None
    info: dict[str, Any] | None = None
    error: str | None = None


def create_app(
    model_dir: str | os.PathLike[str],
    *,
    device: str = "auto",
    max_upload_mb: float = 64,
    token: str | None = None,
    batch_window_ms: float = 5,
    max_batch: int = 8,
    decode_threads: int | None = None,
    on_load_failure: Callable[[str], None] | None = None,
    precision: str = "auto",
    backend: str = "auto",
    compile: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> FastAPI:
    """The service for the model folder ``model_dir``.

    ``token``: when given, ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <token>``. ``max_batch=1``
    turns micro-batching off. ``precision``, ``backend``, ``compile`` and ``cache_dir`` choose how the networks run,
    as for :meth:`cascade.Cascade.from_pretrained`; ``GET /v1/model`` says what was chosen. ``on_load_failure`` is called with the reason if the model cannot be loaded
    (the command line stops the server then; otherwise ``/healthz`` keeps answering 503 with the reason).
    """
    if max_batch < 1:
        raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
    if batch_window_ms < 0 or max_upload_mb <= 0:
        raise ConfigError("batch_window_ms must be 0 or more and max_upload_mb more than 0")
    speed = {"precision": precision, "backend": backend, "compile": compile, "cache_dir": cache_dir}
    state = _State(Path(model_dir), device, int(max_upload_mb * 1024 * 1024), token, speed)
    inference = ThreadPoolExecutor(1, thread_name_prefix="cascade-inference")
    decoding = ThreadPoolExecutor(decode_threads or min(4, os.cpu_count() or 1), thread_name_prefix="cascade-decode")
    batcher = MicroBatcher(inference, batch_window_ms / 1000, max_batch, state.metrics.observe_batch)

    async def load() -> None:
        try:
            state.model, state.info = await asyncio.get_running_loop().run_in_executor(inference, _load, state)
        except Exception as err:  # noqa: BLE001 - any failure leaves the service answering 503 with the reason
            state.error = str(err) if isinstance(err, CascadeError) else f"cannot load the model ({type(err).__name__})"
            log.error("model failed to load: %s", state.error)
            if on_load_failure is not None:
                on_load_failure(state.error)
            return
        batcher.start(state.model)
        state.metrics.ready.set(1)
        log.info("ready: %s on %s, %s on %s", state.info["name"], state.model.device, state.model.precision,
                 state.model.backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(load())
        try:
            yield
        finally:
            loading.cancel()
            await batcher.close()
            decoding.shutdown(wait=False, cancel_futures=True)
            inference.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="cascade",
        version=__version__,
        description="Pneumothorax detection on chest radiographs (a classifier gates a segmenter). "
        "Research use only: not a medical device.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.cascade = state
    _add_docs(app)
    _add_handlers(app, state)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/healthz", summary="Ready once the model is loaded and a warm-up forward has run (else 503)")
    async def healthz() -> JSONResponse:
        _ready(state)
        return JSONResponse({"status": "ready", "model": state.info["name"]})

    @app.get("/metrics", summary="Prometheus metrics (text format)")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/model", summary="The model: stages, networks, input sizes, thresholds, tuned score, sha256s")
    async def model() -> JSONResponse:
        _ready(state)
        return JSONResponse(state.info)

    @app.post(
        "/v1/predict",
        summary="Predict one DICOM: JSON (default), DICOM SEG (?format=seg) or PNG overlay (?format=png)",
        description="Body: `application/dicom`, or `multipart/form-data` with the DICOM as the `file` field. "
        "`?format=seg` answers 204 for a negative image (nothing to segment).",
        responses={204: {"description": "negative image, no DICOM SEG"}},
    )
    async def predict(request: Request, format: str = "json") -> Response:
        start = time.perf_counter()
        if format not in FORMATS:
            raise HTTPProblem(400, f"format must be one of {', '.join(FORMATS)}, got {format[:20]!r}")
        _ready(state)
        loop = asyncio.get_running_loop()
        with batcher.arriving():
            data = await read_upload(request, state.limit)
            decode_start = time.perf_counter()
            image, item = await loop.run_in_executor(decoding, _decode, state.model, data)
            decode_s = time.perf_counter() - decode_start
        request.state.image_id = item.image_id
        answer = await batcher.predict(item)
        pred = answer.prediction
        state.metrics.decisions.labels("positive" if pred.positive else "negative").inc()
        if format == "seg":
            if not pred.positive:
                return Response(status_code=204, headers={"X-Cascade-Positive": "false"})
            seg = await loop.run_in_executor(decoding, _seg_bytes, pred)
            return Response(seg, media_type="application/dicom", headers=_attachment("cascade-seg.dcm"))
        if format == "png":
            png = await loop.run_in_executor(decoding, _png_bytes, image.pixels, pred)
            return Response(png, media_type="image/png")
        return JSONResponse(_json_answer(state, answer, decode_s, time.perf_counter() - start))

    return app


def _load(state: _State) -> tuple[Any, dict[str, Any]]:
    """Load the model folder (sha256-checked), describe it, and run one warm-up forward through both stages."""
    from cascade.pipeline import Cascade

    info = model_info(state.model_dir)
    model = Cascade.from_pretrained(state.model_dir, device=state.device, **state.speed)
    model.warm_up()
    info["runtime"] = {"device": str(model.device), "precision": model.precision, "backend": model.backend}
    return model, info


def model_info(model_dir: Path) -> dict[str, Any]:
    """What ``GET /v1/model`` answers: name, weights digest, stages and members, thresholds, tuned score."""
    from cascade.modeldir import MANIFEST, read_model_dir
    from cascade.stages.checkpoint import WEIGHTS, read_config

    folder = read_model_dir(model_dir)
    hashes = _manifest_hashes(folder.root / MANIFEST)
    stages = {}
    for stage, dirs in (("classifier", folder.classifiers), ("segmenter", folder.segmenters)):
        members = []
        for member in dirs:
            config = read_config(member)
            network = {k: config[k] for k in ("model", "arch", "encoder", "in_chans") if k in config}
            members.append({"folder": member.name, **network, "sha256": hashes[f"{member.name}/{WEIGHTS}"]})
        stages[stage] = {"input_size": folder.preprocessing[stage].size, "members": members}
    validation = folder.metrics.get("validation", {})
    digest = hashlib.sha256("".join(f"{k}:{hashes[k]}\n" for k in sorted(hashes)).encode()).hexdigest()
    return {
        "name": folder.root.resolve().name,
        "weights_sha256": digest,
        "stages": stages,
        "thresholds": folder.thresholds.to_dict(),
        "tta": folder.tta,
        "tuned": {k: validation.get(k) for k in ("mean_dice", "baseline_empty", "sensitivity", "specificity")},
        "versions": folder.versions,
    }


def _manifest_hashes(path: Path) -> dict[str, str]:
    from cascade.fileio import read_json_object

    return dict(read_json_object(path, "model folder manifest")["sha256"])


def _decode(model: Any, data: bytes) -> tuple[Any, Any]:
    """Upload bytes → (DicomImage, prepared item); runs in the decode pool."""
    from cascade.data.dicom import read_dicom

    try:
        image = read_dicom(io.BytesIO(data))
    except CascadeError as err:
        raise HTTPProblem(400, str(err).replace("<file object>", "upload", 1)) from None
    except Exception as err:  # noqa: BLE001 - a decoder failing in a way read_dicom did not foresee: the upload's fault
        raise HTTPProblem(400, f"upload: cannot read the DICOM ({type(err).__name__})") from None
    return image, model.prepare(image)


def _seg_bytes(pred: Any) -> bytes:
    from cascade.outputs.dicom_seg import segmentation_bytes

    try:
        return segmentation_bytes(pred)
    except CascadeError as err:
        raise HTTPProblem(422, str(err)) from None


def _png_bytes(pixels: Any, pred: Any) -> bytes:
    from cascade.data.preprocess import to_uint8
    from cascade.outputs.overlay import overlay_png

    return overlay_png(to_uint8(pixels), pred)


def _json_answer(state: _State, answer: Answer, decode_s: float, total_s: float) -> dict[str, Any]:
    pred = answer.prediction
    assert state.info is not None and pred.mask is not None
    ms = {
        "decode": decode_s,
        "queue": answer.queue_s,
        "classifier": answer.classifier_s,
        "segmenter": answer.segmenter_s,
        "total": total_s,
    }
    return {
        "image_id": pred.image_id,
        "probability": pred.probability,
        "positive": pred.positive,
        "rle": pred.rle,
        "mask_pixels": int(pred.mask.sum()),
        "height": int(pred.mask.shape[0]),
        "width": int(pred.mask.shape[1]),
        "thresholds": state.model.thresholds.to_dict(),
        "tta": state.model.tta,
        "batch_size": answer.batch_size,
        "timing_ms": {k: round(v * 1000, 3) for k, v in ms.items()},
        "model": {"name": state.info["name"], "weights_sha256": state.info["weights_sha256"]},
    }


def _attachment(name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}"'}


def _ready(state: _State) -> None:
    if state.error is not None:
        raise HTTPProblem(503, f"model failed to load: {state.error}")
    if state.model is None:
        raise HTTPProblem(503, "the model is loading; retry in a few seconds")


def _image_hash(image_id: str | None) -> str:
    """12 hex digits of sha256(ImageId): lets an operator match log lines without logging the identifier."""
    return hashlib.sha256(image_id.encode()).hexdigest()[:12] if image_id else "-"


def _add_handlers(app: FastAPI, state: _State) -> None:
    """JSON errors, the token check, metrics and the one log line per request."""

    @app.exception_handler(HTTPProblem)
    async def problem(request: Request, err: HTTPProblem) -> JSONResponse:
        return JSONResponse({"error": err.reason}, status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        fields = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in err.errors())
        return JSONResponse({"error": f"invalid request ({fields})"}, status_code=400)

    @app.middleware("http")
    async def around(request: Request, call_next: Callable[[Request], Any]) -> Response:
        start = time.perf_counter()
        protected = state.token is not None and request.url.path.startswith(PROTECTED)
        if protected and not authorized(request.headers.get("authorization"), state.token):
            response: Response = JSONResponse(
                {"error": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            return _finish(state, request, response, start)
        try:
            response = await call_next(request)
        except Exception as err:  # noqa: BLE001 - a failure answers 500 and is logged by type only
            log.error("internal error in %s: %s", request.url.path, type(err).__name__)
            response = JSONResponse({"error": f"internal error ({type(err).__name__})"}, status_code=500)
        return _finish(state, request, response, start)


def _finish(state: _State, request: Request, response: Response, start: float) -> Response:
    seconds = time.perf_counter() - start
    route = _route(request)
    state.metrics.observe_request(route, request.method, response.status_code, seconds)
    log.info(
        "%s %s %d in=%dB out=%sB %.1fms image=%s",
        request.method,
        route,
        response.status_code,
        getattr(request.state, "bytes_in", 0),
        response.headers.get("content-length", "-"),
        seconds * 1000,
        _image_hash(getattr(request.state, "image_id", None)),
    )
    return response


def _route(request: Request) -> str:
    """The route template (never the raw path, which a client could fill with anything) for logs and metrics."""
    route = getattr(request.scope.get("route"), "path", None)
    if route:
        return str(route)
    for mount in ("/static/", "/docs-assets/"):
        if request.url.path.startswith(mount):
            return mount.rstrip("/")
    return "(unknown)"


def _add_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from the swagger-ui-bundle package's files, served here (works offline, no CDN)."""
    import swagger_ui_bundle
    from fastapi.openapi.docs import get_swagger_ui_html

    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="cascade API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )
