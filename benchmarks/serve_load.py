"""Load test of ``cascade serve``: latency, throughput and errors under C concurrent clients, micro-batching on and
off, against the in-process ``Cascade.predict`` on the same files, and the server's memory over the run.

Same run, same model, same real DICOMs (the SIIM sample images in ``../shared/data``, or ``--images DIR``):

1. in-process baseline: ``Cascade.predict(path)`` one file after another (decode + both stages + thresholds);
2. ``cascade serve`` started as a subprocess on a free loopback port, once with micro-batching (``--max-batch 8``)
   and once without (``--max-batch 1``); for C = 1, 4, 16 concurrent clients (keep-alive HTTP connections),
   ``--requests`` POSTs of the files in turn: p50/p95/p99 latency, throughput, errors and the mean batch size
   (from ``/metrics``);
3. the server's resident memory (RSS) after warm-up and after every configuration, over ``--rss-requests`` more
   requests at C = 4.

Targets (issue 15): HTTP overhead over in-process ≤ 10% at C = 1 (p50); at C = 16, throughput with micro-batching
≥ 1.5x without; zero errors; RSS within ±10% over 1,000 requests. Everything stays on 127.0.0.1 and every phase is
bounded in requests and in seconds (``--max-seconds`` per configuration).

The networks have random weights (speed does not depend on them; ``--model DIR`` takes a real model folder); the
classifier threshold is the 78th percentile of its own probabilities on the files, so 22% pass the gate as at the
challenge's prevalence. Run: ``python benchmarks/serve_load.py`` (resnet18 + U-Net ResNet34 at 512², 300 requests
per configuration) or ``--quick`` (tiny networks at 64², 24 requests: a smoke run, a few minutes on a busy 2-core
machine).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from cascade.inference.pipeline import Cascade  # noqa: E402
from cascade.inference.runtime import Runtime  # noqa: E402
from cascade.stages.checkpoint import build_model  # noqa: E402
from cascade.storage.modeldir import write_model_dir  # noqa: E402
from cascade.thresholds.rule import Thresholds  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_json_argument, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "data" / "siim" / "sample-images"
PREVALENCE = 0.22
CONCURRENCY = (1, 4, 16)


def make_model(folder: Path, files: list[Path], classifier: str, encoder: str, size: int) -> Path:
    """A model folder of random networks whose gate passes 22% of ``files``."""
    import torch

    torch.manual_seed(0)
    prep = {"size": size, "mean": 0.5, "std": 0.25}
    cls = {"stage": "cls", "model": classifier, "in_chans": 1, "preprocessing": prep}
    seg = {"stage": "seg", "arch": "unet", "encoder": encoder, "in_chans": 1, "preprocessing": prep}
    members = ([(build_model(cls), cls)], [(build_model(seg), seg)])
    shut = Thresholds(cls=1.0, top=0.5, area=0, bottom=0.5, min_component=0)
    probs = [Cascade(*members, shut, runtime=Runtime.resolve("cpu")).predict(f).probability for f in files]
    gate = float(np.quantile(probs, 1 - PREVALENCE))
    return write_model_dir(folder, *members, Thresholds(cls=gate, top=0.5, area=0, bottom=0.5, min_component=0))


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)}


def in_process(model_dir: Path, files: list[Path], requests: int, device: str) -> list[float]:
    model = Cascade.from_pretrained(model_dir, runtime=Runtime.resolve(device))
    model.predict(files[0])
    times = []
    for i in range(requests):
        start = time.perf_counter()
        model.predict(files[i % len(files)])
        times.append(time.perf_counter() - start)
    return times


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """``cascade serve`` in a subprocess on a free loopback port; stopped (and reaped) on exit."""

    def __init__(self, model_dir: Path, max_batch: int, device: str, log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._log = log.open("w")
        command = [sys.executable, "-m", "cascade", "serve", str(model_dir), "--port", str(self.port),
                   "--device", device, "--max-batch", str(max_batch), "--batch-window-ms", "5"]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}; see {self._log.name}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server was not ready within 300 s")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        self._log.close()

    def mean_batch(self) -> float:
        text = httpx.get(f"{self.base}/metrics", timeout=10).text
        total = float(re.search(r"^cascade_batch_size_sum (\S+)", text, re.MULTILINE).group(1))
        count = float(re.search(r"^cascade_batch_size_count (\S+)", text, re.MULTILINE).group(1))
        return total / max(count, 1)


def load(base: str, bodies: list[bytes], clients: int, requests: int, max_seconds: float) -> dict[str, float]:
    """``requests`` POSTs from ``clients`` threads (each its own keep-alive connection), stopped at ``max_seconds``."""
    lock = threading.Lock()
    latencies: list[float] = []
    errors = 0
    issued = 0
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        nonlocal errors, issued
        with httpx.Client(base_url=base, timeout=120, headers={"content-type": "application/dicom"}) as http:
            while time.monotonic() < deadline:
                with lock:
                    if issued >= requests:
                        return
                    body = bodies[issued % len(bodies)]
                    issued += 1
                start = time.perf_counter()
                try:
                    ok = http.post("/v1/predict", content=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    latencies.append(time.perf_counter() - start)
                    errors += not ok

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    return {"done": len(latencies), "errors": errors, "throughput": len(latencies) / elapsed,
            **percentiles(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=SAMPLES, help="folder of DICOMs (default: the SIIM samples)")
    parser.add_argument("--model", type=Path, help="a model folder (default: random networks, see --classifier)")
    parser.add_argument("--classifier", default="resnet18")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--input-size", type=int, default=512)
    parser.add_argument("--requests", type=int, default=300, help="requests per configuration")
    parser.add_argument("--rss-requests", type=int, default=1000, help="requests of the memory phase")
    parser.add_argument("--max-seconds", type=float, default=600, help="time limit of each configuration")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny networks at 64², 24 requests: a smoke run")
    add_json_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.classifier, args.encoder, args.input_size = "resnet10t", "tu-resnet10t", 64
        args.requests, args.rss_requests = 24, 48

    files = sorted(args.images.glob("*.dcm"))
    if not files:
        sys.exit(f"no DICOMs in {args.images}")
    bodies = [f.read_bytes() for f in files]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_model(Path(tmp) / "model", files, args.classifier, args.encoder, args.input_size)
        print(f"model {model_dir.name}: {args.classifier} + U-Net {args.encoder} at {args.input_size}², "
              f"{len(files)} real DICOMs, {args.requests} requests per configuration, device {args.device}, "
              f"{os.cpu_count()} cores")

        baseline = percentiles(in_process(model_dir, files, min(args.requests, 100), args.device))
        print(f"in-process Cascade.predict: p50 {baseline['p50']:.1f} ms, p95 {baseline['p95']:.1f} ms")

        rows = []
        rss: list[tuple[str, float, float]] = []
        for batching, max_batch in (("on", 8), ("off", 1)):
            with Server(model_dir, max_batch, args.device, Path(tmp) / f"server-{batching}.log") as server:
                load(server.base, bodies, 1, len(bodies), args.max_seconds)  # warm-up: every file once
                start_rss = rss_mb(server.process.pid)
                for clients in CONCURRENCY:
                    result = load(server.base, bodies, clients, args.requests, args.max_seconds)
                    rows.append((batching, clients, result, server.mean_batch()))
                if batching == "on":
                    load(server.base, bodies, 4, args.rss_requests, args.max_seconds)
                rss.append((batching, start_rss, rss_mb(server.process.pid)))

    print(f"\n{'batching':>8} {'C':>3} {'done':>5} {'errors':>6} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} "
          f"{'req/s':>8} {'batch':>6}")
    for batching, clients, r, batch in rows:
        print(f"{batching:>8} {clients:>3} {r['done']:>5.0f} {r['errors']:>6.0f} {r['p50']:>9.1f} {r['p95']:>9.1f} "
              f"{r['p99']:>9.1f} {r['throughput']:>8.2f} {batch:>6.2f}")
    by = {(b, c): r for b, c, r, _ in rows}
    overhead = by[("on", 1)]["p50"] / baseline["p50"] - 1
    ratio = by[("on", 16)]["throughput"] / by[("off", 16)]["throughput"]
    errors = sum(r["errors"] for _, _, r, _ in rows)
    print(f"\nHTTP overhead at C=1 (p50, batching on) over in-process: {overhead:+.1%} (target ≤ +10%)")
    print(f"throughput at C=16, micro-batching on / off: {ratio:.2f}x (target ≥ 1.5x)")
    print(f"errors: {errors} (target 0)")
    for batching, before, after in rss:
        print(f"server RSS (batching {batching}): {before:.0f} MiB after warm-up → {after:.0f} MiB at the end "
              f"({after / before - 1:+.1%}; target within ±10%)")
    figures: dict = {}
    for batching, clients, r, batch in rows:
        key = f"batching {batching} C={clients}"
        figures.update({f"{key} p50 ms": r["p50"], f"{key} p95 ms": r["p95"], f"{key} p99 ms": r["p99"],
                        f"{key} requests/s": r["throughput"], f"{key} mean batch": batch,
                        f"{key} errors": int(r["errors"])})
    figures.update({"HTTP overhead at C=1 %": 100 * overhead, "micro-batching x at C=16": ratio, "errors": int(errors)})
    for batching, before, after in rss:
        figures.update({f"RSS batching {batching} after warm-up MiB": before,
                        f"RSS batching {batching} at the end MiB": after})
    write_result("serve_load", figures, {"in-process p50 ms": baseline["p50"], "in-process p95 ms": baseline["p95"]},
                 args)


if __name__ == "__main__":
    main()
