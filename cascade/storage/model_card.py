"""``MODEL_CARD.md``: what a model folder is for, what it learned from, how well it did, and its limits.

Written by :func:`cascade.storage.modeldir.write_model_dir` from the manifest it writes (so the card never disagrees
with ``cascade.json``) and the members' configs. Text for people; programs read ``cascade.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cascade.stages import is_shared_gate
from cascade.thresholds.metrics import format_number
from cascade.thresholds.rule import Thresholds

INTENDED_USE = (
    "Research triage of frontal chest radiographs (CR/DX, adults) for pneumothorax: a probability, a decision and a "
    "mask per image, to prioritise reading or to study the task. **Not a medical device**: not cleared or validated "
    "for clinical use; a negative answer never rules out a pneumothorax, and every finding needs a reader."
)

KNOWN_LIMITS = (
    "It knows only the image distribution it was trained on (devices, hospitals, patient ages, views); other data "
    "may need fine-tuning and re-tuning of the thresholds.",
    "The thresholds were tuned on the validation images counted above; with few of them the score is uncertain "
    "(see the ± figure).",
    "Pixels are used as stored (modality LUT only, no VOI windowing); chest drains, lines and text markers can "
    "draw false positives.",
    "Lateral views, paediatric films and non-chest images are outside its intended use; it does not refuse them.",
)


def network_description(config: Mapping[str, Any]) -> str:
    """A stage member's network in words, from its ``config.json`` (the model card and the demo report say it)."""
    network = config.get("network", config)
    if config.get("stage") == "cls" and is_shared_gate(network):
        seg = network.get("segmenter", {})
        return (f"a shared-encoder gate — a head on the segmenter's encoder `{seg.get('encoder', '?')}` "
                f"(sha256 `{str(network.get('encoder_sha256', '?'))[:12]}…`, stored once, in the segmenter)")
    if config.get("stage") == "cls":
        return f"timm `{network.get('model', '?')}` (separate classifier)"
    return f"smp `{network.get('arch', '?')}` with encoder `{network.get('encoder', '?')}`"


def render(manifest: Mapping[str, Any], configs: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """The card's Markdown from ``cascade.json``'s contents and each stage's member configs."""
    metrics = manifest.get("metrics", {})
    v: dict[str, Any] = metrics.get("validation", {})
    data: dict[str, Any] = metrics.get("training_data", {})
    th = manifest["thresholds"]
    prep = manifest["preprocessing"]
    lines = ["# Model card: cascade pneumothorax model", "", "## Intended use", "", INTENDED_USE, ""]
    if data.get("synthetic"):
        lines += [
            "> **Trained and tuned on synthetic films from `cascade synth`.** It shows that the tool works; it has "
            "learned nothing about real radiographs, and `cascade predict` warns when it is given one.",
            "",
        ]
    lines += ["## Model", ""]
    for stage in ("classifier", "segmenter"):
        members = configs.get(stage, [])
        kind = f"{len(members)} members averaged (fold ensemble)" if len(members) > 1 else "1 network"
        nets = ", ".join(sorted({network_description(c) for c in members}))
        lines.append(f"- {stage}: {nets}; {kind}; input {prep[stage]['size']}² px")
    lines += [
        f"- the classifier gates the segmenter; horizontal-flip TTA {'on' if manifest['tta']['hflip'] else 'off'}",
        "",
        "## Training data",
        "",
    ]
    if data:
        lines += [
            f"- {data['images']} images ({data['positives']} positive) in the split; "
            f"{data['validation_images']} validation images tuned the thresholds",
            f"- labels: `{data['labels_file']}`, sha256 `{data['labels_sha256']}`",
            f"- synthetic (`cascade synth`) share of the validation images: {100 * data['synthetic_share']:.0f}%",
        ]
    else:
        lines.append("- not recorded (this folder was not written by `cascade tune`)")
    lines += ["", "## Validation metrics", ""]
    if v:
        se = v.get("standard_error")
        spread = f" ± {1.96 * se:.4f} (95%)" if isinstance(se, (int, float)) else ""
        lines += [
            f"- mean Dice (challenge metric) **{format_number(v.get('mean_dice'))}**{spread}; all-empty baseline "
            f"{format_number(v.get('baseline_empty'))}",
            f"- Dice on true positives {format_number(v.get('dice_positive'))}; sensitivity "
            f"{format_number(v.get('sensitivity'))}; specificity {format_number(v.get('specificity'))}; "
            f"classifier ROC AUC {format_number(v.get('classifier_auc'))}",
            f"- the gate sent {100 * v.get('segmented_share', float('nan')):.1f}% of the validation images to the "
            "segmenter",
            *([f"- **{v['gate_open']}**"] if v.get("gate_open") else []),
            *[f"- warning: {w}" for w in v.get("warnings", [])],
        ]
    else:
        lines.append("- not recorded")
    lines += [
        "",
        "## Thresholds",
        "",
        Thresholds.from_dict(th).describe(code=True) + "; see the README's threshold rule",
        "",
        f"Tuned on probabilities computed at {manifest.get('precision', 'fp32')}"
        + (" by the int8 graphs in this folder (`model.int8.onnx`), which a CPU runs by default; any other precision "
           "moves decisions (docs/speed.md)." if manifest.get("precision") == "int8"
           else "; another precision warns, as decisions near a threshold can move."),
        *([f"The validation fold ran on device {r['device']}, {r['precision']} on {r['backend']} (engine "
           f"`{r['engine']}`{', compiled' if r['compile'] else ''})."] if (r := v.get("runtime")) else []),
        "",
        "## Known limits",
        "",
        *[f"- {limit}" for limit in KNOWN_LIMITS],
        "",
        "## Versions",
        "",
        ", ".join(f"{k} {val}" for k, val in manifest.get("versions", {}).items()),
        "",
    ]
    return "\n".join(lines)
