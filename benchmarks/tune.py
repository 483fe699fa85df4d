"""Benchmark: the exact threshold search (cascade.thresholds.tune) against a plain brute force, and its memory.

    python benchmarks/tune.py [--quick] [--maps N] [--size PX] [--sample-points K] [--stream-maps N]

Part 1 — speed and agreement, same run, same synthetic maps (N maps of PX², default 1,000 of 256²):
  a. on a small grid the brute force (``apply_rule`` on every map at every grid point, mean Dice per point) runs in
     full: the whole score table, the best thresholds and the best score must equal the search's;
  b. on the default grid (174,720 points) the brute force would take hours, so it runs on K grid points drawn at
     random plus the search's best point; every one must equal the search's table, and its time for the whole
     grid is extrapolated from the mean per point (printed as such). Ratio = extrapolated brute force / search.
Part 2 — a streamed search over 12,047 synthetic 1024² maps (``--quick``: 1,000) in a child process: wall time,
  time inside the search, and the child's peak resident memory (ru_maxrss; it includes Python, numpy and cv2).

Synthetic maps: smooth low-frequency noise (a weak segmenter's background), for positives a blurred, slightly
shifted, randomly scaled copy of an elliptic truth mask, for some negatives a spurious blob; the classifier
probability is a noisy function of the truth. Generated on the fly from a seed.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from cascade.thresholds.rule import apply_rule, area_scale
from cascade.thresholds.search import Grid, ThresholdSearch, best_point, tune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_json_argument, write_result  # noqa: E402

TARGET_RATIO = 100.0
TARGET_MEMORY_MB = 1024.0
SMALL_GRID = Grid(
    cls=(0.2, 0.5, 0.8), top=(0.5, 0.75, 0.9), area=(0, 2048), bottom=(0.2, 0.35, 0.5), min_component=(0, 1024)
)


def synthetic(n: int, size: int, seed: int) -> Iterator[tuple[float, np.ndarray, np.ndarray]]:
    """Yield (classifier probability, float32 probability map, bool truth mask), one image at a time."""
    rng = np.random.default_rng(seed)
    low = max(size // 4, 8)
    scale = size / 1024
    for _ in range(n):
        positive = rng.random() < 0.22
        noise = cv2.resize(rng.random((8, 8), dtype=np.float32), (low, low)) * 0.4 * rng.random() ** 2
        mask = np.zeros((size, size), np.uint8)
        blob = np.zeros((low, low), np.float32)
        if positive or rng.random() < 0.15:
            centre = (int(rng.integers(size // 8, 7 * size // 8)), int(rng.integers(size // 8, 7 * size // 8)))
            axes = (int(rng.integers(15, 160) * scale) + 1, int(rng.integers(10, 90) * scale) + 1)
            angle = float(rng.uniform(0, 180))
            shape = np.zeros((size, size), np.uint8)
            cv2.ellipse(shape, centre, axes, angle, 0, 360, 1, -1)
            if positive:
                mask = shape
            shift = rng.integers(-6, 7, 2) * scale
            moved = cv2.warpAffine(shape, np.float32([[1, 0, shift[0]], [0, 1, shift[1]]]), (size, size))
            small = cv2.resize(moved.astype(np.float32), (low, low), interpolation=cv2.INTER_AREA)
            blob = cv2.GaussianBlur(small, (0, 0), 1.5) * rng.uniform(0.3, 1.0)
        seg = cv2.resize(np.maximum(noise, blob), (size, size), interpolation=cv2.INTER_LINEAR)
        cls = 1.0 / (1.0 + np.exp(-rng.normal(1.5 if positive else -1.5, 1.3)))
        yield float(cls), seg, mask.astype(bool)


def brute_force_point(cls, segs, masks, th) -> float:
    """Mean Dice of one setting: re-threshold every map with the rule, Dice per image, mean."""
    total = 0.0
    for p, seg, truth in zip(cls, segs, masks, strict=True):
        pred = apply_rule(p, seg, th, area_scale(*seg.shape))
        inter, union = np.count_nonzero(pred & truth), np.count_nonzero(pred) + np.count_nonzero(truth)
        total += 1.0 if union == 0 else 2.0 * inter / union
    return total / len(segs)


def part1(n: int, size: int, sample: int, seed: int) -> dict:
    cls, segs, masks = map(list, zip(*synthetic(n, size, seed), strict=True))
    print(f"part 1: {n} maps of {size}², {sum(m.any() for m in masks)} positive")

    result = tune(cls, segs, masks, grid=SMALL_GRID, progress=False)
    t0 = time.perf_counter()
    table = np.zeros(SMALL_GRID.shape)
    for index in np.ndindex(*SMALL_GRID.shape):
        table[index] = brute_force_point(cls, segs, masks, SMALL_GRID.point(index))
    brute_small = time.perf_counter() - t0
    best = best_point(table)
    assert np.abs(table - result.scores).max() <= 1e-12, "score tables differ"
    assert best == result.best_index and SMALL_GRID.point(best) == result.thresholds, "best points differ"
    assert abs(table[best] - result.score) <= 1e-12, "best scores differ"
    print(
        f"  a. small grid ({SMALL_GRID.size} points), full brute force {brute_small:.1f} s: identical table, "
        f"best {result.thresholds.to_dict()} score {result.score:.6f}"
    )

    grid = Grid()
    t0 = time.perf_counter()
    result = tune(cls, segs, masks, grid=grid, progress=False)
    fast = time.perf_counter() - t0
    rng = np.random.default_rng(seed + 1)
    points = [tuple(int(rng.integers(0, k)) for k in grid.shape) for _ in range(sample)] + [result.best_index]
    t0 = time.perf_counter()
    for index in points:
        score = brute_force_point(cls, segs, masks, grid.point(index))
        assert abs(score - result.scores[index]) <= 1e-12, f"grid point {index}: {score} != {result.scores[index]}"
    per_point = (time.perf_counter() - t0) / len(points)
    brute = per_point * grid.size
    ratio = brute / fast
    print(
        f"  b. default grid ({grid.size} points): search {fast:.2f} s (score {result.score:.6f}, "
        f"baseline {result.baseline:.6f}); brute force {per_point * 1000:.0f} ms per point, measured on "
        f"{len(points)} points (all equal to the search's table, best point included), extrapolated to "
        f"{brute / 3600:.1f} h for the grid"
    )
    status = "meets" if ratio >= TARGET_RATIO else "MISSES"
    print(f"  speed ratio {ratio:,.0f}x ({status} the {TARGET_RATIO:.0f}x target)")
    return {"maps": n, "map side px": size, "grid points": grid.size, "search s": fast,
            "brute force ms per point": per_point * 1000, "brute force points timed": len(points),
            "brute force extrapolated h": brute / 3600, "speed ratio (x)": ratio, "identical best": True,
            "best score": result.score, "all-empty baseline": result.baseline}


def stream_child(n: int, size: int, seed: int) -> None:
    """Run in a child process: a streamed search; print a JSON line with the timings."""
    t0 = time.perf_counter()
    search, inside = ThresholdSearch(), 0.0
    for p, seg, mask in synthetic(n, size, seed):
        t1 = time.perf_counter()
        search.add(p, seg, mask)
        inside += time.perf_counter() - t1
    t1 = time.perf_counter()
    result = search.result()
    inside += time.perf_counter() - t1
    out = {"wall_s": time.perf_counter() - t0, "search_s": inside, "score": result.score}
    out.update(baseline=result.baseline, thresholds=result.thresholds.to_dict(), grid_points=search.grid.size)
    print(json.dumps(out))


def part2(n: int, seed: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stream-child", str(n), "--seed", str(seed)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    info = json.loads(done.stdout.strip().splitlines()[-1])
    status = "meets" if peak_mb < TARGET_MEMORY_MB else "MISSES"
    print(
        f"part 2: streamed search over {n} synthetic maps of 1024² ({info['grid_points']} grid points): "
        f"wall {info['wall_s']:.1f} s, of which {info['search_s']:.1f} s in the search (the rest generates maps); "
        f"peak RSS {peak_mb:.0f} MB ({status} the {TARGET_MEMORY_MB:.0f} MB target); "
        f"best {info['thresholds']} score {info['score']:.4f}, all-empty {info['baseline']:.4f}"
    )
    return {"streamed maps": n, "streamed wall s": info["wall_s"], "streamed search s": info["search_s"],
            "streamed peak RSS MB": peak_mb}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 maps in part 1, 1,000 streamed maps in part 2")
    parser.add_argument("--maps", type=int, default=1000, help="maps in part 1 (default 1000)")
    parser.add_argument("--size", type=int, default=256, help="map side in part 1 (default 256)")
    parser.add_argument("--sample-points", type=int, default=30, help="brute-forced default-grid points")
    parser.add_argument("--stream-maps", type=int, default=12047, help="maps in part 2 (default 12047)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream-child", type=int, help=argparse.SUPPRESS)
    add_json_argument(parser)
    args = parser.parse_args()
    if args.stream_child is not None:
        stream_child(args.stream_child, 1024, args.seed)
        return 0
    if args.quick:
        args.maps, args.stream_maps, args.sample_points = min(args.maps, 300), min(args.stream_maps, 1000), 10
    one = part1(args.maps, args.size, args.sample_points, args.seed)
    two = part2(args.stream_maps, args.seed)
    baselines = {"brute force extrapolated h": one.pop("brute force extrapolated h"),
                 "brute force ms per point": one.pop("brute force ms per point"),
                 "all-empty baseline": one.pop("all-empty baseline")}
    write_result("tune", {**one, **two}, baselines, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
