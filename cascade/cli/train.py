"""`cascade train`: train the classifier (``--stage cls``) or the segmenter (``--stage seg``) into a run folder."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from cascade.cli.argtypes import non_negative_int, positive_float, positive_int
from cascade.errors import ConfigError
from cascade.stages import GATES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the classifier or the segmenter stage into a run folder",
        description="Train one stage on SIIM-layout data (DICOMs under --images, RLE labels in --labels) and write "
        "RUN_DIR: config.yaml, split.csv, metrics.csv, best/ and last/ (model.safetensors + config.json) and "
        "state.pt for --resume. Settings come from the stage defaults, then --config, then the flags below. "
        "Recommended order: train the segmenter first (--stage seg), then the classifier from its encoder "
        "(--stage cls --init-from SEG_RUN_DIR, same --images/--labels/--folds/--fold/--seed so both validate on the "
        "same fold), then cascade tune --cls CLS_RUN_DIR --seg SEG_RUN_DIR. Without pretrained weights a classifier "
        "trained from scratch on a few hundred images often stays at chance; the segmenter's encoder, taught by the "
        "masks, gives it features to start from (fine-tune them at a lower learning rate: "
        "cascade/configs/tiny-cls-from-seg.yaml, docs/classifier-init.md). "
        "Several GPUs: torchrun --nproc_per_node N -m cascade train ...",
    )
    p.add_argument("--stage", choices=("cls", "seg"), help="cls: image classifier; seg: segmenter (required)")
    p.add_argument("--images", metavar="DIR", help="folder searched recursively for *.dcm (required)")
    p.add_argument("--labels", metavar="CSV", help="label CSV (ImageId, EncodedPixels) (required)")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder to create, absent or empty (required)")
    p.add_argument("--config", metavar="YAML", help=_config_help())
    p.add_argument("--encoder", metavar="NAME", help="cls: timm model name; seg: smp encoder or tu-<timm model>")
    p.add_argument("--arch", metavar="ARCH", help="seg: unet, unetplusplus, fpn, deeplabv3plus, ...")
    p.add_argument("--image-size", type=positive_int, metavar="PX", help="network input size (square)")
    p.add_argument(
        "--epochs", type=positive_int, metavar="N",
        help="passes over the training images (the learning-rate schedule spans them; default from the config)",
    )
    p.add_argument(
        "--time-budget", type=positive_float, metavar="MINUTES",
        help="wall-clock budget of this command: after the first epoch, the number of epochs (and the learning-rate "
        "and positive-share schedules) is set to what fits — all that fit without --epochs, at most --epochs with "
        "it — and training stops cleanly before the budget is spent, best/ complete (optim.time_budget)",
    )
    p.add_argument("--batch-size", type=positive_int, metavar="B", help="per process (per GPU under torchrun)")
    p.add_argument("--folds", type=positive_int, metavar="K", help="number of folds of the split")
    p.add_argument("--fold", type=non_negative_int, metavar="I", help="validation fold (0-based)")
    p.add_argument("--seed", type=non_negative_int, metavar="S", help="seed of the split and of training")
    p.add_argument("--device", metavar="D", help="auto (CUDA when present; under torchrun each process's own GPU), "
                   "cpu, cuda or cuda:N (default: the configuration's runtime.device, auto)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), help="mixed precision (default auto)")
    p.add_argument("--workers", type=non_negative_int, metavar="N", help="DataLoader worker processes")
    p.add_argument("--cache-dir", metavar="DIR", help="preprocessing cache folder (default ~/.cache/cascade/...)")
    p.add_argument("--no-cache", action="store_true", help="decode every image each epoch (no disk cache)")
    p.add_argument(
        "--pretrained", metavar="PATH_OR_NAME",
        help="starting weights for the backbone/encoder: a local state dict (.safetensors, or a torch file read "
        "weights-only), or NAME, a weight tag of the chosen encoder (e.g. imagenet) that timm/smp download from "
        "their hub — which fails at once, with the local-file alternative, when offline (HF_HUB_OFFLINE=1)",
    )
    p.add_argument(
        "--init-from", metavar="RUN_DIR",
        help="cls: build the gate from this segmenter run (its best/): by default a shared-encoder gate, a small head "
        "on the segmenter's own frozen encoder that learns from the labels and the segmenter's maps (the encoder "
        "then runs once per image at inference; docs/gate.md); with --gate separate, a timm classifier whose backbone "
        "starts from the encoder (same architecture: seg encoder tu-NAME or smp's resnetN for --encoder NAME). "
        "Sets network.init_from",
    )
    p.add_argument(
        "--gate", choices=GATES,
        help="cls: which gate (network.gate): shared (a head on the --init-from segmenter's encoder), separate (a "
        "timm classifier with its own backbone), auto (default: shared with --init-from, else separate)",
    )
    p.add_argument(
        "--freeze-backbone-epochs", type=non_negative_int, metavar="N",
        help="train only the head for the first N epochs (optim.freeze_backbone_epochs; default 0)",
    )
    p.add_argument(
        "--resume", nargs="?", const="", metavar="RUN_DIR",
        help="continue a run from its last finished epoch; everything else (stage, data, settings) is read from the "
        "run; flags that are also given must agree with it (only a few, such as --workers or --cache-dir, may change)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(func=run)


MAX_EPOCHS = 10_000
"""The schema's largest ``optim.epochs``: with --time-budget and no --epochs, the budget sets the number."""


def _config_help() -> str:
    from cascade.configs import shipped_configs

    return f"configuration file: a path, or the name of a shipped one ({', '.join(shipped_configs())})"


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration keys set by flags, as a nested mapping for ``config.merge``."""
    out: dict[str, dict[str, Any]] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            out.setdefault(section, {})[key] = value

    put("network", "model" if args.stage == "cls" else "encoder", args.encoder)
    if args.arch is not None and args.stage == "cls":
        raise ConfigError("--arch applies to the segmenter; for --stage cls choose the network with --encoder")
    put("network", "arch", args.arch)
    if args.init_from is not None:
        if args.stage != "cls":
            raise ConfigError("--init-from applies to the classifier (--stage cls): it starts from a segmenter run")
        put("network", "init_from", str(Path(args.init_from).expanduser().resolve()))
    if args.gate is not None and args.stage != "cls":
        raise ConfigError("--gate applies to the classifier (--stage cls)")
    put("network", "gate", args.gate)
    put("optim", "freeze_backbone_epochs", args.freeze_backbone_epochs)
    put("preprocessing", "size", args.image_size)
    put("optim", "epochs", args.epochs)
    put("optim", "time_budget", args.time_budget)
    if args.time_budget is not None and args.epochs is None and not args.resume:
        put("optim", "epochs", MAX_EPOCHS)  # the budget decides
    put("optim", "batch_size", args.batch_size)
    put("data", "folds", args.folds)
    put("data", "fold", args.fold)
    put("data", "workers", args.workers)
    put("data", "cache_dir", args.cache_dir)
    put("data", "cache", False if args.no_cache else None)
    put("runtime", "device", args.device)
    put("runtime", "amp", args.amp)
    flat: dict[str, Any] = dict(out)
    if args.seed is not None:
        flat["seed"] = args.seed
    return flat


def run(args: argparse.Namespace) -> int:
    from cascade.errors import LabelError
    from cascade.storage.fileio import check_output, input_file, path_kind

    resume = args.resume is not None
    if resume:
        _fill_from_run(args)
    missing = [f"--{k}" for k in ("stage", "images", "labels", "out") if getattr(args, k) is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} required (or --resume RUN_DIR to continue a run)")
    input_file(args.images, ConfigError, "folder of images", folder=True)
    input_file(args.labels, LabelError, "label file")
    if args.config and path_kind(args.config) != "missing":  # absent: the name of a shipped configuration
        input_file(args.config, ConfigError, "configuration file")
    out = check_output(args.out, folder=True, inputs=[args.images, args.labels])
    from cascade.stages import config as cfg
    from cascade.stages import training
    from cascade.stages.specs import stage_spec
    from cascade.storage.rundir import CONFIG_FILE  # torch: imported once the output has been checked

    if resume:
        config = cfg.resume_config(out / CONFIG_FILE, args.stage, args.config, overrides(args))
    else:
        config = cfg.resolve(args.stage, args.config, overrides(args))
    row = training.train(
        config, args.images, args.labels, out, resume=resume, pretrained=args.pretrained, progress=not args.quiet
    )
    key = stage_spec(args.stage).best_key
    if os.environ.get("RANK", "0") == "0":
        print(f"cascade train: {out}: epoch {row['epoch']}, {key} {row[key]:.4f} (best/ and last/ written)")
    return 0


def _fill_from_run(args: argparse.Namespace) -> None:
    """``--resume RUN_DIR``: take the run folder, stage and data from the run; given flags must name the same."""
    from cascade.stages.config import read_yaml
    from cascade.storage import rundir

    if args.resume and args.out and Path(args.resume).resolve() != Path(args.out).resolve():
        raise ConfigError(f"--resume {args.resume} and --out {args.out} name different run folders; give one")
    run_dir = Path(args.resume or args.out or "")
    if not (args.resume or args.out):
        raise ConfigError("--resume needs the run folder: --resume RUN_DIR")
    rundir.check_run_dir(run_dir, resume=True)
    args.out = str(run_dir)
    saved_stage = read_yaml(run_dir / rundir.CONFIG_FILE).get("stage")
    if args.stage is None:
        args.stage = saved_stage
    if args.images is not None and args.labels is not None and not (run_dir / rundir.DATA_FILE).exists():
        return  # a run without data.json (an older one): the paths given are all there is
    recorded = rundir.read_sources(run_dir)
    for key in ("images", "labels"):
        given = getattr(args, key)
        if given is None:
            setattr(args, key, recorded[key])
        elif Path(given).resolve() != Path(recorded[key]).resolve():
            raise ConfigError(
                f"{run_dir}: --resume cannot change --{key}: the run was trained on {recorded[key]}, "
                f"given {given} (leave --{key} out to use the run's)"
            )
