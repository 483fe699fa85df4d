"""The DICOM node against batch prediction: `cascade listen` fed by `storescu` from C parallel associations, and
`cascade predict` on the same folder, in one run.

Reports, for the node: throughput (images from the moment the senders start until the last finding is written,
so receiving, the durable store, findings and SEGs are all in it) and the latency from an image's receipt to its
finding (p50, p95, from findings.csv); for `cascade predict`: its own images/s (model loaded, as for the node). The
ratio node/predict is the cost of serving images one association at a time instead of reading a folder; the two
must agree on every decision (checked).

Synthetic SIIM-layout JPEG DICOMs (`cascade synth`, 22% positive), random networks (speed does not depend on the
weights) with the classifier threshold at the 78th percentile of its probabilities on the first 32 images, so that
about 22% of the images pass the gate as with a real classifier.

Run: ``python benchmarks/listen.py [--images 200] [--parallel 4] [--input-size 512]``; ``--quick`` is a smoke run
(24 small images, tiny networks, about a minute). Needs dcmtk (storescu) and the `listen` extra.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402

from cascade.data.synth import generate  # noqa: E402
from cascade.inference.pipeline import Cascade  # noqa: E402
from cascade.inference.runtime import Runtime  # noqa: E402
from cascade.stages.checkpoint import build_model  # noqa: E402
from cascade.storage.modeldir import write_model_dir  # noqa: E402
from cascade.thresholds.rule import Thresholds  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_json_argument, write_result  # noqa: E402

PREVALENCE = 0.22
TIMEOUT = 3600


def make_model(folder: Path, paths: list[Path], args: argparse.Namespace) -> Path:
    """Random networks; the gate passes about 22% of the images (threshold from the first 32)."""
    import torch

    prep = {"size": args.input_size, "mean": 0.5, "std": 0.25}
    torch.manual_seed(0)
    cls = (build_model(c := {"stage": "cls", "model": args.classifier, "in_chans": 1, "preprocessing": prep}), c)
    seg = (build_model(s := {"stage": "seg", "arch": "unet", "encoder": args.encoder, "in_chans": 1,
                             "preprocessing": prep}), s)
    rule = Thresholds(cls=0.0, top=0.5, area=0, bottom=0.5, min_component=0)
    probe = Cascade([cls], [seg], rule, runtime=Runtime.resolve(args.device))
    probs = [p.probability for p in probe.predict_many(paths[:32], batch_size=args.batch_size, workers=0)]
    rule = Thresholds(cls=float(np.quantile(probs, 1 - PREVALENCE)), top=0.5, area=0, bottom=0.5, min_component=0)
    return write_model_dir(folder, [cls], [seg], rule)


def run_predict(model: Path, images: Path, out: Path, args: argparse.Namespace) -> tuple[float, dict[str, bool]]:
    """`cascade predict` on the folder: its reported images/s and each image's decision."""
    done = subprocess.run(
        [sys.executable, "-m", "cascade", "predict", str(model), str(images), "--out", str(out), "--device",
         args.device, "--batch-size", str(args.batch_size)],
        capture_output=True, text=True, timeout=TIMEOUT, check=True,
    )
    rate = float(re.search(r"([\d.]+) images/s", done.stdout)[1])
    with open(out, newline="") as f:
        return rate, {row["ImageId"]: row["EncodedPixels"].strip() != "-1" for row in csv.DictReader(f)}


def run_node(model: Path, paths: list[Path], work: Path, args: argparse.Namespace) -> tuple[float, list[dict], float]:
    """Start the node, push the images from ``parallel`` storescu processes at once, wait for every finding."""
    out, log = work / "node", open(work / "node.log", "wb")
    node = subprocess.Popen(
        [sys.executable, "-m", "cascade", "listen", str(model), "--out", str(out), "--port", "0", "--device",
         args.device, "--batch-size", str(args.batch_size)],
        stdout=subprocess.DEVNULL, stderr=log,
    )
    try:
        port = wait(lambda: re.search(r"listening on [\d.]+:(\d+)", (work / "node.log").read_text()), node)[1]
        folders = []
        for i in range(args.parallel):  # one folder of hard links per association
            folder = work / f"send-{i}"
            folder.mkdir()
            for path in paths[i :: args.parallel]:
                os.link(path, folder / path.name)
            folders.append(folder)
        start = time.time()
        senders = [subprocess.Popen([dcmtk_storescu(), "-xy", "-aec", "CASCADE", "127.0.0.1", port, "+sd", str(f)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for f in folders]
        for sender in senders:
            if sender.wait(timeout=TIMEOUT) != 0:
                raise SystemExit(f"storescu failed: {sender.stderr.read().decode()}")
        sent = time.time() - start
        rows = wait(lambda: r if len(r := read_findings(out / "findings.csv")) >= len(paths) else None, node)
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=600)
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(timeout=60)
        log.close()
    last = max(parse_time(r["finished"]) for r in rows)
    print(f"  storescu x{args.parallel}: all {len(paths)} images acknowledged in {sent:.1f} s")
    return len(paths) / (last - start), rows, sent


def read_findings(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def wait(condition, process: subprocess.Popen):  # noqa: ANN001, ANN201
    """Poll until ``condition()`` is truthy; stop if the node exits or after an hour."""
    deadline = time.monotonic() + TIMEOUT
    while not (value := condition()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the node exited or timed out; see node.log")
        time.sleep(0.05)
    return value


def dcmtk_storescu() -> str | None:
    """dcmtk's storescu: pynetdicom installs an app of the same name into the virtual environment, which is passed
    over (this benchmark pushes with the real dcmtk client)."""
    venv_bin = os.path.realpath(os.path.dirname(sys.executable))
    search = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                             if d and os.path.realpath(d) != venv_bin)
    return shutil.which("storescu", path=search)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=4, help="storescu processes (associations) at once")
    parser.add_argument("--image-size", type=int, default=1024, help="side of the synthetic DICOMs")
    parser.add_argument("--input-size", type=int, default=512, help="network input size of both stages")
    parser.add_argument("--classifier", default="resnet18")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="smoke run: 24 images of 256², tiny networks")
    add_json_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.images, args.parallel, args.image_size, args.input_size = 24, 2, 256, 64
        args.classifier, args.encoder = "resnet10t", "tu-resnet10t"
    if dcmtk_storescu() is None:
        raise SystemExit("storescu (dcmtk) is not installed")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        synth = generate(work / "synth", images=args.images, positive_fraction=PREVALENCE, size=args.image_size,
                         seed=0, progress=False)
        paths = sorted(synth.paths.values())
        model = make_model(work / "model", paths, args)
        print(f"{len(paths)} images of {args.image_size}², classifier {args.classifier}, U-Net {args.encoder} at "
              f"{args.input_size}², batch {args.batch_size}, device {args.device}, {os.cpu_count()} cores")

        rate_predict, decisions = run_predict(model, work / "synth", work / "submission.csv", args)
        print(f"cascade predict: {rate_predict:.2f} images/s")
        rate_node, rows, sent = run_node(model, paths, work, args)
        latency = [(parse_time(r["finished"]) - parse_time(r["received"])) * 1000 for r in rows]
        print(f"cascade listen: {rate_node:.2f} images/s from the first send to the last finding; receipt → finding "
              f"p50 {statistics.median(latency):.0f} ms, p95 {np.percentile(latency, 95):.0f} ms")
        disagree = sum(decisions[r["ImageId"]] != (r["positive"] == "1") for r in rows)
        positives = sum(r["positive"] == "1" for r in rows)
        print(f"node / predict throughput: {rate_node / rate_predict:.2f}x; {positives} positive(s) with a SEG; "
              f"decisions that differ from cascade predict: {disagree} of {len(rows)}")
    write_result("listen", {
        "images": len(rows), "storescu acknowledged all s": sent, "node images/s": rate_node,
        "node / predict x": rate_node / rate_predict, "receipt to finding p50 ms": statistics.median(latency),
        "receipt to finding p95 ms": float(np.percentile(latency, 95)), "positives": positives,
        "decisions differing": disagree,
    }, {"cascade predict images/s": rate_predict}, args)


if __name__ == "__main__":
    main()
