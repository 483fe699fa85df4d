"""`cascade listen`: a DICOM node (Storage SCP) that triages the radiographs sent to it and answers with DICOM SR
and SEG (by DIMSE and/or STOW-RS). The node itself is :class:`cascade.apps.listen.Node`; this module reads arguments."""

from __future__ import annotations

import argparse
import sys

from cascade.cli.argtypes import (
    add_max_pixels_argument,
    add_speed_arguments,
    non_negative_int,
    positive_float,
    positive_int,
    runtime_from_args,
)

DESCRIPTION = """\
Run a DICOM node: a Storage SCP that accepts CR, DX (for presentation and for processing) and Secondary Capture
images plus Verification (C-ECHO), and refuses every other SOP class at association. Each received image is
written to DIR/incoming/ before it is acknowledged, analysed by the cascade (one model worker batching what is
queued), and recorded as one line of DIR/findings.csv (ImageId, StudyInstanceUID, probability, positive,
priority, study_priority, EncodedPixels, received, finished, seg, sr, sc, model, error). Every analysed image gets
a DICOM SR in DIR/sr/, a positive its DICOM SEG in DIR/seg/ (and with --secondary-capture an overlay picture in
DIR/sc/); --forward sends them by C-STORE, --forward-stow by STOW-RS (retried with back-off; what is unconfirmed
waits in DIR/outbox/ or DIR/outbox-stow/ for the next start). DIR/worklist.csv lists the studies in reading order
(HIGH: a positive image, or a ROUTINE study waiting longer than --max-routine-wait). DIR/audit.jsonl records every
received instance and every result sent (hashes of UIDs, never a header value). Images received earlier but not
yet analysed (a kill, a crash) are analysed first at start; an image already in findings.csv is never analysed
twice. SIGTERM or Ctrl-C stops listening, analyses everything acknowledged and exits 0. Logs show one line per
image (a hash of its SOP Instance UID, the decision, ms from receipt to finding), never a header value.

Against hostile or broken peers: an image whose header declares more than --max-pixels is refused at once with
C-STORE status 0xC001 (Cannot understand; Error Comment says why), never stored or decoded; associations addressed
to another called AE title than --ae-title are refused, as are those beyond --max-associations-per-peer from one
peer address or --max-associations in all (A-ASSOCIATE-RJ, transient: the peer may retry); an association idle for
--idle-timeout seconds is aborted."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "listen", help="run a DICOM node that triages received images and sends SRs and SEGs back",
        description=DESCRIPTION
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="model folder written by 'cascade tune'")
    p.add_argument("--ae-title", default="CASCADE", metavar="AET", help="this node's AE title (default CASCADE)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument(
        "--port", type=non_negative_int, default=11112, help="port to listen on (default 11112; 0: any free port)"
    )
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for findings.csv, worklist.csv, audit.jsonl, sr/, seg/, sc/, incoming/, outbox*/")
    p.add_argument("--forward", metavar="AET@HOST:PORT",
                   help="C-STORE each result (SR, SEG, SC) to this AE (e.g. the PACS)")
    p.add_argument("--forward-stow", metavar="URL",
                   help="send each result by STOW-RS to this URL (e.g. http://127.0.0.1:8042/dicom-web/studies)")
    p.add_argument("--secondary-capture", action="store_true",
                   help="also make a Secondary Capture (the outline burned into the image) of each positive")
    p.add_argument(
        "--max-routine-wait", type=float, default=60.0, metavar="MINUTES",
        help="promote a ROUTINE study to HIGH in worklist.csv once it has waited this long (default 60; 0: never)",
    )
    p.add_argument(
        "--accept-from", metavar="AET,…", help="accept associations only from these calling AE titles (default: any)"
    )
    p.add_argument("--device", default="auto", metavar="D", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="B", help="most images per batch (default 8)")
    p.add_argument(
        "--queue-size", type=positive_int, default=64, metavar="N",
        help="received images waiting for the model before senders are held back (default 64)",
    )
    p.add_argument(
        "--retry-max", type=float, default=60.0, metavar="S",
        help="longest wait between attempts to reach the --forward destination (default 60 s)",
    )
    p.add_argument(
        "--idle-timeout", type=positive_float, default=60.0, metavar="S",
        help="abort an association that sends nothing for S seconds (default 60)",
    )
    p.add_argument(
        "--max-associations", type=positive_int, default=16, metavar="N",
        help="most associations open at once, all peers together (default 16)",
    )
    p.add_argument(
        "--max-associations-per-peer", type=positive_int, default=4, metavar="N",
        help="most associations open at once from one peer IP address (default 4): one sender cannot hold them all",
    )
    add_max_pixels_argument(p)
    add_speed_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading
    import warnings

    from cascade.apps.listen import Destination, Node, parse_stow_url
    from cascade.errors import ConfigError
    from cascade.inference.pipeline import Cascade
    from cascade.inference.predicting import caught_warnings

    # pydicom and highdicom warn by quoting header values (patient names among them): never shown here
    warnings.simplefilter("ignore")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s cascade listen: %(message)s"))
    log = logging.getLogger("cascade.listen")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # other libraries' INFO lines stay off: highdicom's name the UIDs it copies
    forward = Destination.parse(args.forward) if args.forward else None
    stow = parse_stow_url(args.forward_stow) if args.forward_stow else None
    if not args.max_routine_wait >= 0:
        raise ConfigError("--max-routine-wait must be 0 (never promote) or positive minutes")
    accept_from = [t.strip() for t in (args.accept_from or "").split(",") if t.strip()]
    with caught_warnings() as load_warnings:  # cascade's own (a precision mismatch names only the folder)
        model = Cascade.from_pretrained(args.model_dir, runtime=runtime_from_args(args))
    model.max_pixels = args.max_pixels
    node = Node(
        model,
        args.out,
        ae_title=args.ae_title,
        host=args.host,
        port=args.port,
        forward=forward,
        forward_stow=stow,
        secondary_capture=args.secondary_capture,
        max_routine_wait=args.max_routine_wait or None,
        accept_from=accept_from,
        batch_size=args.batch_size,
        queue_size=args.queue_size,
        retry_max=args.retry_max,
        idle_timeout=args.idle_timeout,
        max_associations=args.max_associations,
        max_per_peer=args.max_associations_per_peer,
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    node.start()
    host, port = node.address
    if host not in ("127.0.0.1", "localhost", "::1") and not accept_from:
        print(f"cascade listen: warning: listening on {host}, open to other machines; restrict senders with "
              "--accept-from", file=sys.stderr)
    # the library's own warnings (ignored above with the rest) said once, here, without the incoming file's name
    if model.synthetic_model:
        print("cascade listen: warning: this model was trained on synthetic films (cascade synth) only; its findings "
              "on real radiographs mean nothing (see MODEL_CARD.md)", file=sys.stderr)
    for line in load_warnings:
        print(f"cascade listen: warning: {line}", file=sys.stderr)
    destinations = ", ".join(str(d) for d in (forward, stow and _shown(stow)) if d) or "off"
    print(f"cascade listen: {args.ae_title} listening on {host}:{port} ({model.runtime.describe()}, "
          f"{len(node.findings)} finding(s) so far in {args.out}; forward: {destinations})",
          file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        pass
    print("cascade listen: stopping: no new associations; analysing what was received", file=sys.stderr, flush=True)
    node.stop()
    print(f"cascade listen: stopped; {len(node.findings)} finding(s) in {args.out}, "
          f"{node.outbox_waiting} result(s) waiting to be sent", file=sys.stderr, flush=True)
    return 0


def _shown(url: str) -> str:
    from cascade.apps.listen.forward import shown_url

    return f"STOW-RS {shown_url(url)}"
