"""Reports of a threshold search (`cascade tune`) and of an evaluation (`cascade evaluate`): JSON, CSV and PNG.

Plots use matplotlib's object API (``Figure``, Agg canvas) — no pyplot state, no display needed. Every file is
written atomically, so a report folder never holds a half-written plot.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cascade.storage.fileio import atomic_path, atomic_write_json, atomic_write_text
from cascade.thresholds.metrics import Confusion, Summary, format_number, json_float, sensitivity, specificity
from cascade.thresholds.rule import FIELDS
from cascade.thresholds.search import TuneResult

_LABELS = {
    "cls": "classifier gate (cls)",
    "top": "top threshold",
    "area": "min pixels ≥ top (at 1024²)",
    "bottom": "bottom (mask) threshold",
    "min_component": "min component (px at 1024²)",
}


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path



def plot_confusion(c: Confusion, path: Path, title: str) -> Path:
    """2 x 2 image-level confusion matrix with counts and row shares."""
    fig = Figure(figsize=(4.6, 4))
    ax = fig.subplots()
    table = np.array([[c.tp, c.fn], [c.fp, c.tn]])
    shares = table / np.maximum(table.sum(axis=1, keepdims=True), 1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(table):
        colour = "white" if shares[i, j] > 0.6 else "black"
        ax.text(j, i, f"{count}\n({100 * shares[i, j]:.1f}%)", ha="center", va="center", color=colour, fontsize=12)
    ax.set_xticks([0, 1], ["predicted positive", "predicted empty"])
    ax.set_yticks([0, 1], ["truly positive", "truly negative"])
    rates = f"sensitivity {format_number(sensitivity(c), 3)}, specificity {format_number(specificity(c), 3)}"
    ax.set_title(f"{title}\n{rates}")
    return _save(fig, path)


def plot_cls_bottom(result: TuneResult, path: Path) -> Path:
    """Heatmap of mean Dice over classifier gate x bottom, the other thresholds at the best point."""
    g, table = result.grid, result.cls_bottom_table()
    best = result.thresholds
    fig = Figure(figsize=(1.6 + 0.45 * len(g.bottom), 1.4 + 0.3 * len(g.cls)))
    ax = fig.subplots()
    image = ax.imshow(table, cmap="viridis", aspect="auto", origin="lower", vmin=min(result.baseline, table.min()))
    ax.set_xticks(range(len(g.bottom)), [f"{v:g}" for v in g.bottom], rotation=45)
    ax.set_yticks(range(len(g.cls)), [f"{v:g}" for v in g.cls])
    ax.set_xlabel(_LABELS["bottom"])
    ax.set_ylabel(_LABELS["cls"])
    c, _, _, b, _ = result.best_index
    ax.plot(b, c, marker="*", color="red", markersize=16, markeredgecolor="white")
    ax.set_title(
        f"Mean Dice at top {best.top:g}, area {best.area:g}, min component {best.min_component:g}\n"
        f"best {result.score:.4f} (★), all-empty baseline {result.baseline:.4f}"
    )
    fig.colorbar(image, ax=ax, label="mean Dice")
    return _save(fig, path)


def plot_breakdown(result: TuneResult, path: Path) -> Path:
    """Mean Dice as each threshold varies alone around the best point (one panel per threshold)."""
    data = result.breakdown()
    fig = Figure(figsize=(16, 3.4))
    axes = fig.subplots(1, len(FIELDS), sharey=True)
    for ax, name in zip(axes, FIELDS):
        values, scores = data[name]["values"], data[name]["mean_dice"]
        ax.plot(values, scores, marker="o", markersize=3)
        ax.axhline(result.baseline, color="grey", linestyle="--", linewidth=1, label="all empty")
        best = getattr(result.thresholds, name)
        ax.plot([best], [result.scores[result.best_index]], marker="*", color="red", markersize=14)
        ax.set_xlabel(_LABELS[name])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean Dice")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"Mean Dice varying one threshold, the others at the best (★ = {result.score:.4f})")
    return _save(fig, path)


def plot_roc(result: TuneResult, path: Path) -> Path:
    """ROC curve of the classifier probabilities, with the chosen gate marked."""
    from sklearn.metrics import roc_curve

    fig = Figure(figsize=(4.6, 4.4))
    ax = fig.subplots()
    truth, probs = result.truth_positive, result.cls_probs
    auc = result.classifier_auc
    if np.isfinite(auc):
        fpr, tpr, _ = roc_curve(truth, probs)
        ax.plot(fpr, tpr, label=f"classifier, AUC {auc:.4f}")
        gate = probs >= result.thresholds.cls
        x = np.count_nonzero(gate & ~truth) / np.count_nonzero(~truth)
        y = np.count_nonzero(gate & truth) / np.count_nonzero(truth)
        ax.plot([x], [y], "r*", markersize=14, label=f"gate cls ≥ {result.thresholds.cls:g}")
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "ROC undefined:\nonly one class in the truth", ha="center", va="center")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate (1 − specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("Classifier ROC (image level)")
    return _save(fig, path)


_OP_COLUMNS = ("target_min_sensitivity", "mean_dice", "achieved_sensitivity", "specificity", *FIELDS)
_UNREACHED = "n/a: no searched threshold reaches this sensitivity on the validation images"


def _op_rows(result: TuneResult) -> list[list[Any]]:
    rows = []
    for op in result.operating_points():
        th = op["thresholds"] or {}
        rows.append([op["min_sensitivity"], op["mean_dice"], op.get("sensitivity"), op.get("specificity")])
        rows[-1] += [th.get(k) for k in FIELDS]
    return rows


def plot_operating_points(result: TuneResult, path: Path) -> Path:
    """The operating-point table (best mean Dice at each minimum sensitivity) as a figure."""
    rows = _op_rows(result)
    cells = [[format_number(v) if i < 4 else ("n/a" if v is None else f"{v:g}") for i, v in enumerate(r)] for r in rows]
    for r, raw in zip(cells, rows):
        r[0] = f"≥ {raw[0]:g}"
    fig = Figure(figsize=(12, 1.3 + 0.34 * (len(rows) + 1)))
    ax = fig.subplots()
    ax.axis("off")
    headers = ["target\nsensitivity", "mean\nDice", "achieved\nsensitivity", "specificity",
               *(name.replace("_", "\n") for name in FIELDS)]
    table = ax.table(cellText=cells, colLabels=headers, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.5)
    for (row, _), cell in table.get_celld().items():
        if row == 0:
            cell.set_height(cell.get_height() * 1.6)
    ax.set_title(f"Operating points: best mean Dice with at least the target sensitivity (chosen: {result.score:.4f})")
    if any(r[1] is None for r in rows):
        fig.text(0.5, 0.02, _UNREACHED, ha="center", fontsize=9, style="italic")
    return _save(fig, path)


def plot_frontier(result: TuneResult, path: Path) -> Path:
    """Best mean Dice against the share of images the gate sends to the segmenter, one point per gate ``cls``."""
    rows = [r for r in result.frontier() if r["mean_dice"] is not None]
    fig = Figure(figsize=(6, 4.2))
    ax = fig.subplots()
    ax.plot([r["segmented_share"] for r in rows], [r["mean_dice"] for r in rows], "o-", color="tab:blue",
            markersize=4, label="best mean Dice with gate cls")
    ax.axhline(result.baseline, color="grey", linestyle=":", label=f"all-empty baseline {result.baseline:.4f}")
    ax.plot([result.segmented_share], [result.score], "r*", markersize=14,
            label=f"chosen: cls {result.thresholds.cls:g}, {100 * result.segmented_share:.0f}% segmented")
    ax.set_xlabel("share of images sent to the segmenter")
    ax.set_ylabel("mean Dice (validation)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_title("What the classifier gate saves and what it costs")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """A small CSV (empty cells for None), written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    atomic_write_text(path, buf.getvalue())
    return path


def write_tune_report(result: TuneResult, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``tune.json``, ``operating_points.csv``, ``frontier.csv`` and the PNG plots into ``out_dir``; return
    their paths."""
    out = Path(out_dir)
    atomic_write_json(out / "tune.json", result.to_dict())
    frontier_columns = ("cls", "segmented_share", "skipped_negatives", "mean_dice")
    return [
        out / "tune.json",
        _write_csv(out / "operating_points.csv", _OP_COLUMNS, _op_rows(result)),
        _write_csv(out / "frontier.csv", frontier_columns,
                   [[r[k] for k in frontier_columns] for r in result.frontier()]),
        plot_frontier(result, out / "frontier.png"),
        plot_cls_bottom(result, out / "dice_cls_bottom.png"),
        plot_breakdown(result, out / "dice_by_threshold.png"),
        plot_confusion(result.confusion, out / "confusion.png", "Validation images at the chosen thresholds"),
        plot_roc(result, out / "roc.png"),
        plot_operating_points(result, out / "operating_points.png"),
    ]


def plot_dice_histogram(dices: np.ndarray, true_positive: np.ndarray, path: Path) -> Path:
    """Histogram of per-image Dice on truly positive images (negatives score 0 or 1 and are in the matrix)."""
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    values = dices[true_positive]
    ax.hist(values, bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white")
    ax.set_xlabel("per-image Dice")
    ax.set_ylabel("truly positive images")
    mean = format_number(float(values.mean()) if values.size else None)
    ax.set_title(f"Dice on all {values.size} truly positive images (mean {mean}, misses as 0)")
    return _save(fig, path)


def write_evaluate_report(
    summary: Summary,
    dices: np.ndarray,
    true_positive: np.ndarray,
    out_dir: str | os.PathLike[str],
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    """Write ``evaluate.json`` (summary + ``extra``), the confusion matrix and the Dice histogram."""
    out = Path(out_dir)
    atomic_write_json(out / "evaluate.json", {**summary.to_dict(), **(extra or {})})
    title = (
        f"Mean Dice {format_number(json_float(summary.mean_dice))} over {summary.images} images "
        f"(all-empty {format_number(json_float(summary.baseline_empty))})"
    )
    return [
        out / "evaluate.json",
        plot_confusion(summary.confusion, out / "confusion.png", title),
        plot_dice_histogram(np.asarray(dices), np.asarray(true_positive, dtype=bool), out / "dice_positive.png"),
    ]
