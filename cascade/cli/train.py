"""`cascade train`: train the classifier (``--stage cls``) or the segmenter (``--stage seg``) into a run folder."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from cascade.cli.argtypes import non_negative_int, positive_int
from cascade.errors import ConfigError


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
    p.add_argument("--stage", required=True, choices=("cls", "seg"), help="cls: image classifier; seg: segmenter")
    p.add_argument("--images", required=True, metavar="DIR", help="folder searched recursively for *.dcm")
    p.add_argument("--labels", required=True, metavar="CSV", help="label CSV (ImageId, EncodedPixels)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to create (absent or empty)")
    p.add_argument("--config", metavar="YAML", help="configuration file (a path, or a shipped name such as seg-unet-resnet34-512)")
    p.add_argument("--encoder", metavar="NAME", help="cls: timm model name; seg: smp encoder or tu-<timm model>")
    p.add_argument("--arch", metavar="ARCH", help="seg: unet, unetplusplus, fpn, deeplabv3plus, ...")
    p.add_argument("--image-size", type=positive_int, metavar="PX", help="network input size (square)")
    p.add_argument("--epochs", type=positive_int, metavar="N")
    p.add_argument("--batch-size", type=positive_int, metavar="B", help="per process (per GPU under torchrun)")
    p.add_argument("--folds", type=positive_int, metavar="K", help="number of folds of the split")
    p.add_argument("--fold", type=non_negative_int, metavar="I", help="validation fold (0-based)")
    p.add_argument("--seed", type=non_negative_int, metavar="S", help="seed of the split and of training")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto: cuda when available")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), help="mixed precision (default auto)")
    p.add_argument("--workers", type=non_negative_int, metavar="N", help="DataLoader worker processes")
    p.add_argument("--cache-dir", metavar="DIR", help="preprocessing cache folder (default ~/.cache/cascade/...)")
    p.add_argument("--no-cache", action="store_true", help="decode every image each epoch (no disk cache)")
    p.add_argument(
        "--pretrained", metavar="PATH_OR_NAME",
        help="starting weights for the backbone/encoder: a local state dict (safetensors or torch) or a hub name",
    )
    p.add_argument(
        "--init-from", metavar="RUN_DIR",
        help="cls: start the backbone from this segmenter run's encoder (its best/), which must be the same timm "
        "architecture: seg encoder tu-NAME (or smp's resnetN) for classifier --encoder NAME; sets network.init_from",
    )
    p.add_argument(
        "--freeze-backbone-epochs", type=non_negative_int, metavar="N",
        help="train only the head for the first N epochs (optim.freeze_backbone_epochs; default 0)",
    )
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR from its last finished epoch")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(func=run)


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
    put("optim", "freeze_backbone_epochs", args.freeze_backbone_epochs)
    put("preprocessing", "size", args.image_size)
    put("optim", "epochs", args.epochs)
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
    from cascade.fileio import check_output, input_file, path_kind

    input_file(args.images, ConfigError, "folder of images", folder=True)
    input_file(args.labels, LabelError, "label file")
    if args.config and path_kind(args.config) != "missing":  # absent: the name of a shipped configuration
        input_file(args.config, ConfigError, "configuration file")
    out = check_output(args.out, folder=True, inputs=[args.images, args.labels])
    from cascade.stages import config as cfg  # torch: imported once the output has been checked
    from cascade.stages import training

    if args.resume:
        training.check_run_dir(out, resume=True)
        config = cfg.resume_config(out / training.CONFIG_FILE, args.stage, args.config, overrides(args))
    else:
        config = cfg.resolve(args.stage, args.config, overrides(args))
    row = training.train(
        config, args.images, args.labels, out, resume=args.resume, pretrained=args.pretrained, progress=not args.quiet
    )
    key = training.BEST_KEY[args.stage]
    if os.environ.get("RANK", "0") == "0":
        print(f"cascade train: {out}: epoch {row['epoch']}, {key} {row[key]:.4f} (best/ and last/ written)")
    return 0
