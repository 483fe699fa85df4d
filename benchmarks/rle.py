"""Benchmark: RLE encode+decode of the real SIIM annotations, cascade.data.rle against a per-pixel Python loop.

    python benchmarks/rle.py [--labels PATH] [--baseline-subset N]

Both implementations run in the same process on the same annotations, and their outputs are compared. The loop
takes a few hundred milliseconds per 1024x1024 annotation, so by default it runs on an evenly spaced subset and its
time for all annotations is scaled from the per-annotation mean; the ratio is taken on that same subset.
Then encoding alone is timed on the same subset's masks in both memory layouts, C-ordered and column-major
(Fortran order), each against the loop on the same masks, and both ratios are printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from cascade.data.labels import read_labels
from cascade.data.rle import rle_decode, rle_encode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_json_argument, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LABELS = REPO.parent / "shared" / "data" / "siim" / "siim-train-rle.csv.gz"
SIZE = 1024
TARGET = 50.0


def loop_encode(mask: np.ndarray) -> str:
    """The straightforward encoder: visit every pixel in column-major order, track where runs start and end."""
    height, width = mask.shape
    rows = mask.tolist()
    values: list[int] = []
    run_start, previous_end = -1, 0
    for col in range(width):
        for row in range(height):
            index = col * height + row
            if rows[row][col]:
                if run_start < 0:
                    run_start = index
            elif run_start >= 0:
                values += [run_start - previous_end, index - run_start]
                previous_end, run_start = index, -1
    if run_start >= 0:
        values += [run_start - previous_end, height * width - run_start]
    return " ".join(map(str, values)) if values else "-1"


def loop_decode(rle: str, height: int, width: int) -> np.ndarray:
    """The straightforward decoder: walk the runs, set each pixel of a flat column-major list, then reshape."""
    flat = [False] * (height * width)
    tokens = [int(t) for t in rle.split()]
    position = 0
    for skip, length in zip(tokens[0::2], tokens[1::2], strict=True):
        position += skip
        for index in range(position, position + length):
            flat[index] = True
        position += length
    return np.array(flat, dtype=bool).reshape(width, height).T


def _ours(rles: list[str]) -> tuple[float, list[str]]:
    """Seconds to decode and re-encode ``rles`` with cascade.data.rle, and the re-encoded strings."""
    start = time.perf_counter()
    encoded = [rle_encode(rle_decode(rle, SIZE, SIZE)) for rle in rles]
    return time.perf_counter() - start, encoded


def _encode_layouts(rles: list[str], repeats: int) -> tuple[dict[str, float], bool]:
    """Encoding alone, per memory layout of the same masks: C-ordered (what rle_decode and most image code give) and
    column-major (Fortran order: a transposed view, what the RLE's own order is), each timed against the per-pixel
    loop on the same masks. Prints one line per layout; returns ``{layout: ratio}`` and whether every encoder gave
    the original strings."""
    c_masks = [np.ascontiguousarray(rle_decode(rle, SIZE, SIZE)) for rle in rles]
    layouts = {"C-ordered": c_masks, "column-major": [np.asfortranarray(m) for m in c_masks]}
    expected = [" ".join(rle.split()) for rle in rles]
    ratios, identical = {}, True
    for name, masks in layouts.items():
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            ours = [rle_encode(mask) for mask in masks]
            best = min(best, time.perf_counter() - start)
        start = time.perf_counter()
        loop = [loop_encode(mask) for mask in masks]
        loop_seconds = time.perf_counter() - start
        identical &= ours == loop == expected
        ratios[name] = loop_seconds / best
        print(
            f"  encode only, {name + ' masks:':20s} {1e3 * best / len(masks):.3f} ms vs loop "
            f"{1e3 * loop_seconds / len(masks):.1f} ms per annotation -> {ratios[name]:.0f}x faster"
        )
    return ratios, identical


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS, help="label CSV (default: %(default)s)")
    parser.add_argument(
        "--baseline-subset",
        type=int,
        default=60,
        metavar="N",
        help="annotations the per-pixel loop runs on, evenly spaced (0 = all; default: %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="passes of the fast codec, best kept (default: 3)")
    add_json_argument(parser)
    args = parser.parse_args(argv)
    if not args.labels.is_file():
        print(
            f"benchmarks/rle.py: label file {args.labels} not found; pass --labels PATH "
            "(the real file lives in ../shared/data/siim/ beside the repository)",
            file=sys.stderr,
        )
        return 2

    labels = read_labels(args.labels)
    rles = [rle for image_rles in labels.annotations.values() for rle in image_rles]
    n = len(rles)
    step = 1 if args.baseline_subset <= 0 else max(1, n // args.baseline_subset)
    subset = rles[::step][: args.baseline_subset or None]
    print(f"RLE encode+decode at {SIZE}x{SIZE}: {n} annotations from {args.labels}")

    passes = [_ours(rles) for _ in range(args.repeats)]
    ours_all = min(seconds for seconds, _ in passes)
    identical_all = passes[0][1] == [" ".join(r.split()) for r in rles]
    ours_sub, ours_encoded = min((_ours(subset) for _ in range(args.repeats)), key=lambda r: r[0])

    start = time.perf_counter()
    loop_masks = [loop_decode(rle, SIZE, SIZE) for rle in subset]
    loop_encoded = [loop_encode(mask) for mask in loop_masks]
    loop_sub = time.perf_counter() - start
    identical_sub = loop_encoded == ours_encoded and all(
        np.array_equal(mask, rle_decode(rle, SIZE, SIZE)) for mask, rle in zip(loop_masks, subset, strict=True)
    )

    per_ours, per_loop = ours_sub / len(subset), loop_sub / len(subset)
    ratio = per_loop / per_ours
    scaled = "" if len(subset) == n else f"; scaled to all {n}: ~{per_loop * n:.0f} s (not run)"
    print(
        f"  cascade.data.rle (numpy):  all {n} in {ours_all:.2f} s = {1e3 * ours_all / n:.3f} ms/annotation "
        f"(best of {args.repeats})"
    )
    print(
        f"  per-pixel Python loop:     {len(subset)} of {n} (one in {step}) in {loop_sub:.1f} s = "
        f"{1e3 * per_loop:.1f} ms/annotation{scaled}"
    )
    print(
        f"  same {len(subset)} annotations: {1e3 * per_ours:.3f} ms vs {1e3 * per_loop:.1f} ms per annotation "
        f"-> {ratio:.0f}x faster (target >= {TARGET:.0f}x: {'met' if ratio >= TARGET else 'NOT met'})"
    )
    print(
        f"  identical results: loop vs ours on the subset {'yes' if identical_sub else 'NO'}; "
        f"all {n} re-encode to their original string {'yes' if identical_all else 'NO'}"
    )
    encode_ratios, identical_layouts = _encode_layouts(subset, args.repeats)
    print(f"  identical results: both layouts, ours and the loop {'yes' if identical_layouts else 'NO'}")
    write_result("rle", {
        "annotations": n,
        "speed-up vs per-pixel loop (x)": ratio,
        "cascade.data.rle ms per annotation": 1e3 * per_ours,
        "all annotations s": ours_all,
        "identical results": identical_sub and identical_all and identical_layouts,
        **{f"encode only, {layout} masks, speed-up (x)": r for layout, r in encode_ratios.items()},
    }, {"per-pixel loop ms per annotation": 1e3 * per_loop, "loop annotations timed": len(subset)}, args)
    return 0 if identical_sub and identical_all and identical_layouts else 1


if __name__ == "__main__":
    sys.exit(main())
