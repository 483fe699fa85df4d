"""The web service: ``create_app(model_dir)`` → a FastAPI (ASGI) app with the REST API, the page and the metrics.

The model loads in the background when the app starts (``/healthz`` and the API answer 503 until it is loaded and a
warm-up forward has run). A request's body is read with a size limit while it streams, decoded in a thread pool,
predicted in a micro-batch (:mod:`cascade.apps.serve.batching`) on the inference thread, and its answer (JSON, DICOM
SEG, SR or Secondary Capture, PNG overlay) is encoded in the pool again, so the event loop never blocks. Uploads stay
in memory. STOW-RS (``POST /dicomweb/studies``, with ``results_dir``) predicts every instance of a
``multipart/related`` body and writes its SR (and a positive's SEG) under ``results_dir/<StudyInstanceUID>/``.

Memory is bounded: at most ``max_in_flight`` predictions are in progress (more get 503 before their body is read),
each holding at most one upload (``max_upload_mb``); at most ``decode_threads`` decode at once, each image within
``max_pixels``; a decoded image is reduced to the networks' inputs in the decode thread, so a request waiting for
its batch holds no full-size image (only a uint8 copy when a PNG overlay or a Secondary Capture is asked for). A
STOW-RS request holds one slot and its whole body (``max_upload_mb``).

Each request logs one line: method, route, status, bytes in and out, milliseconds and a short hash of the image's
ImageId; never a header value or an identifier. With ``audit_log``, every received instance and every result
sent is a record of :class:`cascade.storage.audit.AuditLog` (the sha256 of the SOP Instance UID, never the UID).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from cascade import __version__
from cascade.apps.serve.auth import authorized
from cascade.apps.serve.batching import Answer, MicroBatcher
from cascade.apps.serve.metrics import Metrics
from cascade.apps.serve.stow import (
    CANNOT_UNDERSTAND,
    DICOM_JSON,
    DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    Outcome,
    boundary_of,
    is_uid,
    related_parts,
    store_response,
)
from cascade.apps.serve.uploads import DICOM, HTTPProblem, content_type, read_body, read_upload
from cascade.data.dicom import MAX_PIXELS, check_max_pixels
from cascade.errors import CascadeError, ConfigError
from cascade.inference.runtime import Runtime
from cascade.storage.audit import AuditLog, instance_hash

if TYPE_CHECKING:
    from cascade.storage.modeldir import ModelIdentity

log = logging.getLogger("cascade.serve")

FORMATS = ("json", "seg", "sr", "sc", "png")
NEGATIVE_204 = ("seg", "sc")
"""Formats a negative image has no answer in (nothing to segment or draw): 204."""
DOWNLOADS = {"seg": "cascade-seg.dcm", "sr": "cascade-sr.dcm", "sc": "cascade-sc.dcm"}
STATIC = Path(__file__).resolve().parent / "static"
PROTECTED = ("/v1/", "/metrics", "/dicomweb/")
"""Path prefixes that need the bearer token when the service has one (the page, /healthz and /docs do not)."""
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
"""The methods RFC 9110 defines: the ones logs and metrics name; any other token counts as ``other``."""
UNKNOWN = "other"
"""Label and log value of a method outside :data:`METHODS` and of a path no route matches (bounded cardinality)."""


@dataclass
class _State:
    """What the app holds between requests."""

    model_dir: Path
    runtime: Runtime
    """How the networks run (resolved once; int8 graphs of the folder applied at load)."""
    limit: int
    token: str | None
    max_pixels: int
    max_in_flight: int
    results_dir: Path | None = None
    """Where STOW-RS writes each instance's results (None: STOW-RS is off)."""
    audit: AuditLog | None = None
    metrics: Metrics = field(default_factory=Metrics)
    model: Any = None
    info: dict[str, Any] | None = None
    error: str | None = None
    in_flight: int = 0


def create_app(
    model_dir: str | os.PathLike[str],
    *,
    runtime: Runtime | None = None,
    max_upload_mb: float = 64,
    token: str | None = None,
    batch_window_ms: float = 5,
    max_batch: int = 8,
    decode_threads: int | None = None,
    max_pixels: int = MAX_PIXELS,
    max_in_flight: int = 32,
    on_load_failure: Callable[[str], None] | None = None,
    results_dir: str | os.PathLike[str] | None = None,
    audit_log: str | os.PathLike[str] | None = None,
) -> FastAPI:
    """The service for the model folder ``model_dir``.

    ``token``: when given, ``/v1/*``, ``/dicomweb/*`` and ``/metrics`` need ``Authorization: Bearer <token>``.
    ``max_batch=1`` turns micro-batching off. ``max_pixels``: the pixel budget of an upload (checked from its header
    before decoding; over it: 400). ``max_in_flight``: predictions in progress at once (more: 503). ``runtime``
    (:class:`cascade.inference.runtime.Runtime`, default all ``auto``) is how the networks run; ``GET /v1/model`` says
    what was chosen. ``on_load_failure`` is called
    with the reason if the model cannot be loaded (the command line stops the server then; otherwise ``/healthz``
    keeps answering 503 with the reason).
    ``results_dir``: turns STOW-RS on, writing each instance's SR and SEG there. ``audit_log``: the JSON-lines file
    of :class:`cascade.storage.audit.AuditLog` records.
    """
    if max_batch < 1:
        raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
    if batch_window_ms < 0 or max_upload_mb <= 0 or max_in_flight < 1:
        raise ConfigError("batch_window_ms must be 0 or more, max_upload_mb more than 0 and max_in_flight at least 1")
    limit = int(max_upload_mb * 1024 * 1024)
    state = _State(Path(model_dir), runtime or Runtime.resolve(), limit, token, check_max_pixels(max_pixels),
                   max_in_flight, Path(results_dir) if results_dir is not None else None)
    if state.results_dir is not None and not state.results_dir.is_dir():
        raise ConfigError(f"{state.results_dir}: the results folder does not exist")
    state.audit = AuditLog(audit_log) if audit_log is not None else None
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
        log.info("ready: %s, %s", state.info["name"], state.model.runtime.describe())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from cascade.data.dicom import hold_dicom_loggers

        hold_dicom_loggers()
        loading = asyncio.create_task(load())
        try:
            yield
        finally:
            loading.cancel()
            await batcher.close()
            decoding.shutdown(wait=False, cancel_futures=True)
            inference.shutdown(wait=False, cancel_futures=True)
            if state.audit is not None:
                state.audit.close()

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
        summary="Predict one DICOM: JSON (default), DICOM SEG (?format=seg), DICOM SR (?format=sr), DICOM Secondary "
        "Capture (?format=sc) or PNG overlay (?format=png)",
        description="Body: `application/dicom`, or `multipart/form-data` with the DICOM as the `file` field. "
        "`?format=seg` and `?format=sc` answer 204 for a negative image (nothing to segment or draw); the SR is "
        "answered for every image (it references the SEG it would be sent with for a positive).",
        responses={204: {"description": "negative image: no DICOM SEG or Secondary Capture"}},
    )
    async def predict(request: Request, format: str = "json") -> Response:
        start = time.perf_counter()
        if format not in FORMATS:
            raise HTTPProblem(400, f"format must be one of {', '.join(FORMATS)}, got {format[:20]!r}")
        _ready(state)
        with _in_flight(state):
            seen: dict[str, Any] = {"instance": None}
            try:
                response = await _predict(request, format, start, seen)
            except Exception as err:
                status = err.status if isinstance(err, HTTPProblem) else 500
                await _audit(state, request, "result", sent=format, status=status, **seen)
                raise
            await _audit(state, request, "result", sent=format, status=response.status_code, **seen)
            return response

    async def _predict(request: Request, format: str, start: float, seen: dict[str, Any]) -> Response:
        """The answer in ``format``; fills ``seen`` with what the audit record says of the instance."""
        loop = asyncio.get_running_loop()
        with batcher.arriving():
            data = await read_upload(request, state.limit)
            item, grey, decode_s = await _receive(request, data, format in ("png", "sc"), "predict", seen)
        request.state.image_id = item.image_id
        answer = await batcher.predict(item)
        pred = answer.prediction
        seen.update(_outcome(pred))
        state.metrics.decisions.labels("positive" if pred.positive else "negative").inc()
        if format in NEGATIVE_204 and not pred.positive:
            return Response(status_code=204, headers={"X-Cascade-Positive": "false"})
        if format in DOWNLOADS:
            pred = replace(pred, image=grey)
            dicom = await loop.run_in_executor(decoding, _dicom_bytes, format, pred)
            return Response(dicom, media_type=DICOM, headers=_attachment(DOWNLOADS[format]))
        if format == "png":
            png = await loop.run_in_executor(decoding, _png_bytes, grey, pred)
            return Response(png, media_type="image/png")
        return JSONResponse(_json_answer(state, answer, decode_s, time.perf_counter() - start))

    async def _receive(
        request: Request, data: bytes, keep_grey: bool, via: str, seen: dict[str, Any]
    ) -> tuple[Any, Any, float]:
        """Decode an upload: (prepared item, uint8 image or None, decode seconds), audited as received; the
        bytes die here."""
        decode_start = time.perf_counter()
        try:
            item, grey = await asyncio.get_running_loop().run_in_executor(
                decoding, _decode, state.model, data, keep_grey
            )
        except HTTPProblem:
            await _audit(state, request, "received", via=via, instance=None, bytes=len(data))
            raise
        seen["instance"] = instance_hash(_sop_uids(item.header)[1])
        await _audit(state, request, "received", via=via, instance=seen["instance"], bytes=len(data))
        return item, grey, time.perf_counter() - decode_start

    @app.post(
        "/dicomweb/studies",
        summary="STOW-RS: predict each DICOM instance of a multipart/related body and keep its results",
        description="Body: `multipart/related; type=\"application/dicom\"`, one DICOM file per part. Each instance "
        "is predicted and its DICOM SR (and, for a positive, its DICOM SEG) written under the service's "
        "`--results-dir`; the answer is the PS3.18 store response (`application/dicom+json`): 200 all accepted, "
        "202 some failed, 409 all failed.",
    )
    async def stow(request: Request) -> Response:
        return await _stow(request, None)

    @app.post("/dicomweb/studies/{study}", summary="STOW-RS into one study: instances of another study fail")
    async def stow_study(request: Request, study: str) -> Response:
        return await _stow(request, study)

    async def _stow(request: Request, study: str | None) -> Response:
        if state.results_dir is None:
            raise HTTPProblem(404, "STOW-RS is off: start the service with --results-dir DIR")
        _ready(state)
        with _in_flight(state):
            boundary = boundary_of(*content_type(request))
            parts = related_parts(await read_body(request, state.limit), boundary)
            outcomes = await asyncio.gather(*(_store(request, part.media_type, part.data, study) for part in parts))
        status, body = store_response(list(outcomes))
        return JSONResponse(body, status_code=status, media_type=DICOM_JSON)

    async def _store(request: Request, media_type: str, data: bytes, study: str | None) -> Outcome:
        """Predict one STOW-RS instance and write its results; what became of it, audited (never raises)."""
        seen: dict[str, Any] = {"instance": None}
        uids: list[str | None] = [None, None]
        failure = await _store_one(request, media_type, data, study, seen, uids)
        failed = {} if failure is None else {"failure": f"{failure:04X}"}
        await _audit(state, request, "result", sent="stow", status=200 if failure is None else 409, **failed, **seen)
        return Outcome(*(uid if is_uid(uid) else None for uid in uids), failure)

    async def _store_one(
        request: Request, media_type: str, data: bytes, study: str | None, seen: dict[str, Any],
        uids: list[str | None],
    ) -> int | None:
        """The failure reason of one STOW-RS instance (None: accepted); fills ``seen`` and ``uids``."""
        if media_type not in ("", DICOM):
            return CANNOT_UNDERSTAND
        try:
            with batcher.arriving():
                item, _, _ = await _receive(request, data, False, "stow", seen)
        except HTTPProblem:
            return CANNOT_UNDERSTAND
        uids[:] = _sop_uids(item.header)
        its_study = item.header.get("StudyInstanceUID") if item.header is not None else None
        if not all(is_uid(uid) for uid in (*uids, its_study)) or study not in (None, its_study):
            return DOES_NOT_MATCH
        try:
            pred = (await batcher.predict(item)).prediction
        except Exception as err:  # noqa: BLE001 - reported in the answer as this instance's failure, not a 500
            log.error("STOW-RS prediction failed: %s", type(err).__name__)
            return PROCESSING_FAILURE
        seen.update(_outcome(pred))
        state.metrics.decisions.labels("positive" if pred.positive else "negative").inc()
        assert state.results_dir is not None
        try:
            await asyncio.get_running_loop().run_in_executor(decoding, _write_results, state.results_dir, pred)
        except OSError:
            return OUT_OF_RESOURCES
        except CascadeError:
            return PROCESSING_FAILURE
        return None

    return app


@contextlib.contextmanager
def _in_flight(state: _State) -> Iterator[None]:
    """Hold one of the ``max_in_flight`` prediction slots for the request; 503 at once (body unread) when none is
    free, so uploads, decodes and answers held in memory stay bounded however many clients connect."""
    if state.in_flight >= state.max_in_flight:
        raise HTTPProblem(503, f"busy: {state.max_in_flight} predictions are in progress; retry shortly")
    state.in_flight += 1
    try:
        yield
    finally:
        state.in_flight -= 1


def _load(state: _State) -> tuple[Any, dict[str, Any]]:
    """Load the model folder (sha256-checked), describe it, and run one warm-up forward through both stages."""
    from cascade.inference.pipeline import Cascade

    info = model_info(state.model_dir)
    model = Cascade.from_pretrained(state.model_dir, runtime=state.runtime)
    model.max_pixels = state.max_pixels  # the one budget every decode reads, as in the DICOM node
    model.warm_up()
    info["runtime"] = model.runtime.as_dict()
    return model, info


def model_info(model_dir: Path) -> dict[str, Any]:
    """What ``GET /v1/model`` answers: name, cascade version, weights digest, stages and members, thresholds, tuned
    score."""
    from cascade.storage.modeldir import model_identity, read_model_dir

    folder = read_model_dir(model_dir)
    stages = {}
    for stage, dirs in (("classifier", folder.classifiers), ("segmenter", folder.segmenters)):
        members = []
        for member in dirs:
            config = folder.configs[member]
            network = {k: config[k] for k in ("model", "arch", "encoder", "in_chans", "gate") if k in config}
            if config.get("gate") == "shared":  # a head on the segmenter's encoder, named by its sha256
                network["shared_encoder_sha256"] = config["encoder_sha256"]
            members.append({"folder": member.name, **network, "sha256": folder.sha256[member]})
        stages[stage] = {"input_size": folder.preprocessing[stage].size, "members": members}
    validation = folder.metrics.get("validation", {})
    return {
        **model_fields(model_identity(folder)),
        "stages": stages,
        "thresholds": folder.thresholds.to_dict(),
        "tta": folder.tta,
        "tuned": {k: validation.get(k) for k in ("mean_dice", "baseline_empty", "sensitivity", "specificity")},
        "versions": folder.versions,
    }


def model_fields(identity: ModelIdentity | None) -> dict[str, str]:
    """The model every answer and audit record names: folder name, cascade version, weights digest."""
    from cascade.storage.modeldir import ModelIdentity

    identity = identity or ModelIdentity()
    return {"name": identity.name, "version": identity.version, "weights_sha256": identity.weights_sha256}


def _sop_uids(header: Any) -> tuple[str | None, str | None]:
    """An instance's SOP Class and SOP Instance UIDs (None where it has none)."""
    if header is None:
        return None, None
    return header.get("SOPClassUID") or None, header.get("SOPInstanceUID") or None


def _outcome(pred: Any) -> dict[str, Any]:
    """What an audit record says of a prediction: decision, probability, model."""
    return {"decision": "positive" if pred.positive else "negative", "probability": float(pred.probability),
            "model": model_fields(pred.model)}


async def _audit(state: _State, request: Request, event: str, **fields: Any) -> None:
    """One audit record (off the event loop: it is fsync'd), with the peer's address; nothing without a log."""
    if state.audit is None:
        return
    peer = request.client.host if request.client is not None else None
    record = partial(state.audit.record, event=event, peer=peer, **fields)
    await asyncio.get_running_loop().run_in_executor(None, record)


def _decode(model: Any, data: bytes, keep_grey: bool) -> tuple[Any, Any]:
    """Upload bytes → (prepared item, the image as uint8 when ``keep_grey`` else None); runs in the decode pool.

    The float image dies here: a request waiting for its batch holds the networks' inputs, not the full image."""
    from cascade.data.dicom import read_dicom
    from cascade.data.preprocess import to_uint8

    try:
        image = read_dicom(io.BytesIO(data), max_pixels=model.max_pixels)
    except CascadeError as err:
        raise HTTPProblem(400, str(err).replace("<file object>", "upload", 1)) from None
    except Exception as err:  # noqa: BLE001 - a decoder failing in a way read_dicom did not foresee: the upload's fault
        raise HTTPProblem(400, f"upload: cannot read the DICOM ({type(err).__name__})") from None
    return model.prepare(image), to_uint8(image.pixels) if keep_grey else None


def _dicom_bytes(format: str, pred: Any) -> bytes:
    """The DICOM SEG, SR or Secondary Capture of ``pred`` (the SR references the SEG of a positive); 422 when the
    source cannot carry one."""
    from cascade.outputs.dicom_seg import segmentation, segmentation_bytes
    from cascade.outputs.dicom_sr import report_bytes
    from cascade.outputs.secondary_capture import secondary_capture_bytes

    try:
        if format == "seg":
            return segmentation_bytes(pred)
        if format == "sc":
            return secondary_capture_bytes(pred)
        return report_bytes(pred, segmentation(pred) if pred.positive else None)
    except CascadeError as err:
        raise HTTPProblem(422, str(err)) from None


def _write_results(folder: Path, pred: Any) -> None:
    """Write the SR of a STOW-RS instance (and first the SEG of a positive, which the SR references) as
    ``folder/<StudyInstanceUID>/<SOPInstanceUID>.sr.dcm`` (``.seg.dcm``), atomically (UIDs checked by the caller)."""
    from cascade.outputs.dicom_common import save
    from cascade.outputs.dicom_seg import segmentation
    from cascade.outputs.dicom_sr import report

    study = folder / pred.header.StudyInstanceUID
    study.mkdir(exist_ok=True)
    seg = segmentation(pred) if pred.positive else None
    if seg is not None:
        save(seg, study / f"{pred.header.SOPInstanceUID}.seg.dcm")
    save(report(pred, seg), study / f"{pred.header.SOPInstanceUID}.sr.dcm")


def _png_bytes(grey: Any, pred: Any) -> bytes:
    from cascade.outputs.overlay import overlay_png

    return overlay_png(grey, pred)


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
        "model": model_fields(pred.model),
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
        if "content-length" in request.headers and "transfer-encoding" in request.headers:
            # ambiguous framing (the request smuggling of RFC 9112 §6.1): refuse, and close the connection, so bytes
            # after this request's end are never read as another request
            response = JSONResponse(
                {"error": "a request must not carry both Content-Length and Transfer-Encoding"},
                status_code=400,
                headers={"Connection": "close"},
            )
            return _finish(state, request, response, start)
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
    method = request.method if request.method in METHODS else UNKNOWN
    state.metrics.observe_request(route, method, response.status_code, seconds)
    log.info(
        "%s %s %d in=%dB out=%sB %.1fms image=%s",
        method,
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
    return UNKNOWN


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
