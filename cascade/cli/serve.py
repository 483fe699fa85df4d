"""`cascade serve`: the cascade as a web service (page, REST API, DICOM SEG, metrics) with uvicorn."""

from __future__ import annotations

import argparse
import sys

from cascade.cli.argtypes import add_max_pixels_argument, add_speed_arguments, positive_int, runtime_from_args

DESCRIPTION = """\
Serve a model folder over HTTP: a page at / (drop a DICOM, see the outlined mask, download RLE, PNG, DICOM SEG,
SR or Secondary Capture), the REST API POST /v1/predict (JSON, ?format=seg, sr, sc or png), GET /v1/model,
GET /healthz, GET /metrics (Prometheus) and the API's OpenAPI page at /docs. With --results-dir, STOW-RS at
POST /dicomweb/studies: each instance is predicted and its DICOM SR (and a positive's SEG) written there. The model
is loaded once and kept warm; requests that arrive within --batch-window-ms share one forward pass (up to
--max-batch images). Binds to loopback by default; any other
address needs --token-file, and every /v1, /dicomweb and /metrics request must then send 'Authorization: Bearer TOKEN'.
Uploads are processed in memory, and memory is bounded: at most --max-in-flight predictions at once (more get 503),
each upload within --max-upload-mb, each image within --max-pixels (checked from its header, before decoding), at
most --decode-threads decodes at once (docs/robustness.md sizes it). The log has one line per request and never a
patient identifier; --audit-log keeps a record of every instance received and result sent (fsync'd JSON lines,
the SOP Instance UID only as its sha256)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model folder as a web service (page + REST API)",
                       description=DESCRIPTION)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="model folder written by 'cascade tune'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    p.add_argument("--device", default="auto", metavar="D", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--max-upload-mb", type=float, default=64, metavar="MB",
                   help="largest accepted upload in MiB (default 64); larger ones get 413 before they are read")
    p.add_argument("--token-file", metavar="FILE",
                   help="file holding the bearer token clients must send (required to bind a non-loopback address)")
    p.add_argument("--batch-window-ms", type=float, default=5, metavar="MS",
                   help="how long a request may wait for others to share its forward pass (default 5)")
    p.add_argument("--max-batch", type=positive_int, default=8, metavar="N",
                   help="most images per forward pass (default 8; 1 turns micro-batching off)")
    p.add_argument("--decode-threads", type=positive_int, default=None, metavar="N",
                   help="threads decoding uploads and encoding answers (default: cores, at most 4): the most "
                   "images decoded at once")
    p.add_argument("--max-in-flight", type=positive_int, default=32, metavar="N",
                   help="most predictions in progress at once, from upload to answer (default 32; keep it at least "
                   "--max-batch); more get 503 before their body is read")
    add_max_pixels_argument(p)
    p.add_argument("--results-dir", metavar="DIR",
                   help="turn STOW-RS (POST /dicomweb/studies) on: each instance's DICOM SR, and a positive's SEG, "
                   "is written to DIR/<StudyInstanceUID>/ (the folder must exist)")
    p.add_argument("--audit-log", metavar="FILE",
                   help="append one JSON line per instance received and per result sent to FILE (created 0600)")
    add_speed_arguments(p)
    p.set_defaults(func=run)


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1..65535, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from cascade.apps.serve import create_app
    from cascade.apps.serve.auth import is_loopback, read_token
    from cascade.errors import ConfigError
    from cascade.storage.modeldir import read_model_dir

    if args.token_file is None and not is_loopback(args.host):
        raise ConfigError(
            f"--host {args.host} is not a loopback address: anyone who reaches it could use the service; "
            "give --token-file FILE (clients then send 'Authorization: Bearer TOKEN') or bind 127.0.0.1"
        )
    if args.max_upload_mb <= 0 or args.batch_window_ms < 0:
        raise ConfigError("--max-upload-mb must be more than 0 and --batch-window-ms 0 or more")
    token = read_token(args.token_file) if args.token_file else None
    read_model_dir(args.model_dir)  # a bad model folder or runtime stops here with one line, before anything listens
    runtime = runtime_from_args(args)
    failed: list[str] = []

    def stop(reason: str) -> None:
        failed.append(reason)
        server.should_exit = True

    app = create_app(
        args.model_dir,
        runtime=runtime,
        max_upload_mb=args.max_upload_mb,
        token=token,
        batch_window_ms=args.batch_window_ms,
        max_batch=args.max_batch,
        decode_threads=args.decode_threads,
        max_pixels=args.max_pixels,
        max_in_flight=args.max_in_flight,
        results_dir=args.results_dir,
        audit_log=args.audit_log,
        on_load_failure=stop,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, access_log=False, log_config=None, timeout_graceful_shutdown=10
    )
    server = uvicorn.Server(config)
    print(
        f"cascade serve: loading {args.model_dir}; page http://{_url_host(args.host)}:{args.port}/ "
        f"(API docs /docs, ready when /healthz answers 200){'; token required' if token else ''}",
        file=sys.stderr,
    )
    server.run()
    if failed:
        print(f"cascade serve: error: model failed to load: {failed[0]}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
