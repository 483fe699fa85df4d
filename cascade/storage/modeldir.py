"""MODEL_DIR: the self-contained folder a trained cascade ships in — the one reader and the one writer.

Layout (the README's "The model folder"; a single model is exactly this)::

    MODEL_DIR/cascade.json                  schema_version, thresholds, tta, precision, preprocessing, metrics,
                                            versions, members per stage, sha256 of every weight file
    MODEL_DIR/classifier/config.json        + model.safetensors   (classifier member 0)
    MODEL_DIR/segmenter/config.json         + model.safetensors   (segmenter member 0)
    MODEL_DIR/MODEL_CARD.md                 intended use, training data, validation metrics, limits (for people)

A fold ensemble adds ``classifier-1/``, ``classifier-2/``, … and ``segmenter-1/``, …; ``cascade.json`` lists the
member folders of each stage in ``members``. Nothing here unpickles: weights are safetensors, metadata is JSON.
``cascade.json`` records the sha256 of every file of every member (``config.json`` and ``model.safetensors``).
Reading checks the schema version, each config's sha256 and every field a network is built from, refuses member
folders or files that lead (by symlink) outside MODEL_DIR, and checks each weight file's sha256 on the same bytes it
loads (:meth:`ModelDir.load`), so a changed or truncated file, a missing file, malformed JSON or an edited config is
refused with one clear :class:`~cascade.errors.ModelError`.

``precision`` (``fp32``, ``bf16``, ``fp16`` or ``int8``) is the precision the thresholds were tuned at; it was added
within schema version 1, and a folder without it was tuned in fp32 (the only precision before), so it reads as
``fp32``. A folder tuned at ``int8`` also holds each member's calibrated int8 ONNX graph (``<member>/model.int8.onnx``,
:mod:`cascade.inference.quantize`), hashed in ``cascade.json`` like the other files and checked on the bytes that are
run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Union

from torch import nn

from cascade import __version__
from cascade.data.preprocess import Preprocessing
from cascade.errors import CascadeError, ModelError
from cascade.stages.checkpoint import CONFIG, WEIGHTS, load_stage, read_config, save_stage, sha256_file, validate_config
from cascade.stages.gate import attach_shared_gates
from cascade.stages.specs import SPECS
from cascade.storage import model_card
from cascade.storage.fileio import (
    atomic_write_json,
    atomic_write_text,
    parse_json_object,
    path_kind,
    pending,
    read_json_bytes,
    read_json_object,
)
from cascade.thresholds.rule import Thresholds

SCHEMA_VERSION = 1
MANIFEST = "cascade.json"
REPORT_DIR = "report"
MODEL_CARD = "MODEL_CARD.md"
"""The human-readable summary of the folder (intended use, data, metrics, limits); not read by code."""
TUNED_PRECISIONS = ("fp32", "bf16", "fp16", "int8")
INT8_GRAPH = "model.int8.onnx"
"""A member's calibrated int8 graph, in folders tuned at ``int8`` (:mod:`cascade.inference.quantize`)."""
STAGES = {spec.noun: spec.code for spec in SPECS.values()}
"""Stage folder base name → the ``stage`` value its ``config.json`` must carry."""

Member = Union[str, os.PathLike, tuple[nn.Module, Mapping[str, Any]]]
"""A stage member to write: a stage folder (``config.json`` + ``model.safetensors``) or a ``(model, config)``."""


@dataclass(frozen=True)
class ModelDir:
    """A verified MODEL_DIR: its settings and the stage folders of each stage's members."""

    root: Path
    thresholds: Thresholds
    tta: bool
    classifiers: list[Path]
    segmenters: list[Path]
    preprocessing: dict[str, Preprocessing]
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    precision: str = "fp32"
    """The precision the thresholds were tuned at (``fp32`` for folders written before it was recorded)."""
    configs: dict[Path, dict[str, Any]] = field(default_factory=dict, repr=False)
    """The verified ``config.json`` of each member folder."""
    sha256: dict[Path, str] = field(default_factory=dict, repr=False)
    """The recorded sha256 of each member folder's weight file."""
    int8_sha256: dict[Path, str] = field(default_factory=dict, repr=False)
    """The recorded sha256 of each member folder's int8 graph (folders tuned at int8)."""
    weights_sha256: str = ""
    """The model's digest: :func:`weights_digest` of the sha256 of every member file recorded in ``cascade.json``
    (what every result names, :class:`ModelIdentity`, and the web service's ``weights_sha256``)."""

    def load(self) -> tuple[list[tuple[nn.Module, dict[str, Any]]], list[tuple[nn.Module, dict[str, Any]]]]:
        """The networks of both stages (classifiers, segmenters), each weight file read once: hashed and loaded from
        the same bytes; a shared-encoder gate is attached to the segmenter it was trained on."""
        stages = tuple([load_stage(d, config=self.configs[d], sha256=self.sha256[d]) for d in dirs]
                       for dirs in (self.classifiers, self.segmenters))
        attach_shared_gates(*stages)
        return stages

    def int8_graphs(self, stage: str) -> list[bytes]:
        """The int8 ONNX graphs of ``stage``'s members, each checked against its recorded sha256 on the bytes
        returned; a ``ModelError`` when the folder was not tuned at int8."""
        dirs = self.classifiers if stage == "classifier" else self.segmenters
        if self.precision != "int8":
            raise ModelError(
                f"{self.root}: has no int8 graphs (tuned at {self.precision}); run 'cascade tune --precision int8' "
                "to make an int8 model folder"
            )
        graphs = []
        for d in dirs:
            path = d / INT8_GRAPH
            try:
                data = path.read_bytes()
            except OSError as err:
                raise ModelError(f"{path}: cannot be read ({err.strerror})") from None
            if hashlib.sha256(data).hexdigest() != self.int8_sha256[d]:
                raise ModelError(f"{path}: sha256 does not match {MANIFEST}: the file was changed or truncated")
            graphs.append(data)
        return graphs


@dataclass(frozen=True)
class ModelIdentity:
    """What every result names as the model that made it (the DICOM SEG, SR and Secondary Capture): the model
    folder's name and weights digest (:attr:`ModelDir.weights_sha256`; both empty for networks given in memory), the
    cascade version that ran, the thresholds in use and what they were tuned for (empty when not recorded or changed
    after loading). Built once per model by :func:`model_identity`; :attr:`cascade.inference.pipeline.Prediction.model`
    carries it."""

    name: str = ""
    weights_sha256: str = ""
    version: str = __version__
    thresholds: Thresholds | None = None
    tuned_for: str = ""


def model_identity(info: ModelDir) -> ModelIdentity:
    """The identity of a verified model folder (the one function the DICOM outputs' model names come from): its
    folder name (resolved, so ``.`` names the folder) and :attr:`ModelDir.weights_sha256`."""
    return ModelIdentity(info.root.resolve().name, info.weights_sha256, __version__, info.thresholds,
                         tuned_for(info.metrics))


def weights_digest(hashes: Mapping[str, Any]) -> str:
    """The model's weights digest: sha256 of the ``path:sha256`` lines, sorted, of ``cascade.json``'s ``sha256``
    (every member's ``config.json``, ``model.safetensors`` and int8 graph), so one value names the networks."""
    return hashlib.sha256("".join(f"{k}:{hashes[k]}\n" for k in sorted(hashes)).encode()).hexdigest()


def tuned_for(metrics: Mapping[str, Any]) -> str:
    """One line saying what the thresholds of ``cascade.json`` were tuned for (its ``metrics.validation``), e.g.
    ``highest mean Dice on 120 validation images (fold 0 of 5, fp32): mean Dice 0.81, sensitivity 0.90, specificity
    0.88``; empty when the folder records no validation."""
    v = metrics.get("validation")
    if not isinstance(v, Mapping) or not isinstance(v.get("images"), int):
        return ""
    where = []
    if isinstance(v.get("fold"), int) and isinstance(v.get("folds"), int):
        where.append(f"fold {v['fold']} of {v['folds']}")
    elif isinstance(v.get("out_of_fold"), Mapping):
        where.append("out-of-fold")
    if isinstance(v.get("precision"), str):
        where.append(v["precision"])
    line = f"highest mean Dice on {v['images']} validation images" + (f" ({', '.join(where)})" if where else "")
    scores = [f"{key.replace('_', ' ')} {v[key]:.3f}" for key in ("mean_dice", "sensitivity", "specificity")
              if isinstance(v.get(key), (int, float)) and not isinstance(v.get(key), bool)]
    limits = [f"{label} {v[key]:g}" for key, label in (("min_sensitivity", "sensitivity at least"),
                                                       ("max_segmented_share", "segmented share at most"))
              if isinstance(v.get(key), (int, float)) and not isinstance(v.get(key), bool)]
    return line + (f": {', '.join(scores)}" if scores else "") + (f"; subject to {', '.join(limits)}" if limits else "")


def member_name(stage: str, index: int) -> str:
    """Folder name of member ``index`` of ``stage`` (``classifier``, ``classifier-1``, …)."""
    return stage if index == 0 else f"{stage}-{index}"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that define the networks, recorded so a model folder can be reproduced."""
    versions = {"cascade": __version__}
    for name, dist in (("torch", "torch"), ("timm", "timm"), ("smp", "segmentation_models_pytorch")):
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def write_model_dir(
    directory: str | os.PathLike[str],
    classifiers: Sequence[Member],
    segmenters: Sequence[Member],
    thresholds: Thresholds | Mapping[str, Any],
    *,
    metrics: Mapping[str, Any] | None = None,
    tta: bool = False,
    precision: str = "fp32",
    report_files: Sequence[str | os.PathLike[str]] = (),
    int8_graphs: Mapping[str, Sequence[str | os.PathLike[str] | bytes]] | None = None,
) -> Path:
    """Write a complete MODEL_DIR atomically: built in a temporary folder beside it, then renamed into place.

    ``classifiers`` / ``segmenters`` are the members of each stage (one each for a single model, several for a fold
    ensemble), each a stage folder or a ``(model, config)`` pair. ``report_files`` are copied into ``report/``.
    ``precision`` is the one the thresholds were tuned at; ``int8`` needs ``int8_graphs``: per stage
    (``"classifier"``, ``"segmenter"``) one graph (a path or its bytes) per member, in member order.
    An existing ``directory`` is replaced only if it is a MODEL_DIR or empty, so a typo cannot wipe other data.
    """
    target = Path(directory)
    th = thresholds if isinstance(thresholds, Thresholds) else Thresholds.from_dict(thresholds)
    if not classifiers or not segmenters:
        raise ModelError(f"{target}: a model folder needs at least one classifier and one segmenter")
    if precision not in TUNED_PRECISIONS:
        raise ModelError(f"{target}: precision must be one of {', '.join(TUNED_PRECISIONS)}, got {precision!r}")
    if (precision == "int8") != (int8_graphs is not None):
        raise ModelError(f"{target}: int8 graphs are written with precision int8, and precision int8 needs them")
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    with pending(tmp):
        try:
            stages = {"classifier": classifiers, "segmenter": segmenters}
            members, member_configs, weights, preprocessing = _write_stages(tmp, target, stages, int8_graphs)
            reports = _copy_reports(tmp, report_files)
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "thresholds": th.to_dict(),
                "tta": {"hflip": bool(tta)},
                "precision": precision,
                "preprocessing": preprocessing,
                "members": members,
                "sha256": weights,
                "metrics": dict(metrics or {}),
                "versions": library_versions(),
                "report": reports,
            }
            atomic_write_json(tmp / MANIFEST, manifest)
            atomic_write_text(tmp / MODEL_CARD, model_card.render(manifest, member_configs))
            tmp.chmod(0o755)
            _swap_into_place(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_stages(
    tmp: Path, target: Path, stages: Mapping[str, Sequence[Member]],
    int8_graphs: Mapping[str, Sequence[str | os.PathLike[str] | bytes]] | None,
) -> tuple[dict[str, list[str]], dict[str, list[dict[str, Any]]], dict[str, str], dict[str, dict[str, Any]]]:
    """Write every stage's member folders (and int8 graphs) into ``tmp``: what ``cascade.json`` records of them —
    member names, configs (for the model card), the sha256 of every file, each stage's preprocessing."""
    members: dict[str, list[str]] = {}
    member_configs: dict[str, list[dict[str, Any]]] = {}
    weights: dict[str, str] = {}
    preprocessing: dict[str, dict[str, Any]] = {}
    for stage, sources in stages.items():
        names = [member_name(stage, i) for i in range(len(sources))]
        configs = [_write_member(tmp / name, source, stage) for name, source in zip(names, sources)]
        preprocessing[stage] = _stage_preprocessing(configs, stage, tmp).to_dict()
        members[stage] = names
        member_configs[stage] = configs
        graphs = _write_int8_graphs(tmp, target, stage, names, int8_graphs)
        for name in names:
            for file in (CONFIG, WEIGHTS, *((INT8_GRAPH,) if graphs else ())):
                weights[f"{name}/{file}"] = sha256_file(tmp / name / file)
    return members, member_configs, weights, preprocessing


def _write_int8_graphs(
    tmp: Path, target: Path, stage: str, names: list[str],
    int8_graphs: Mapping[str, Sequence[str | os.PathLike[str] | bytes]] | None,
) -> list[str | os.PathLike[str] | bytes]:
    """Write ``stage``'s int8 graphs (one per member, in member order) into its member folders; return them (none
    without ``int8_graphs``), so the caller hashes them with the other files."""
    graphs = list(int8_graphs[stage]) if int8_graphs is not None else []
    if int8_graphs is not None and len(graphs) != len(names):
        raise ModelError(f"{target}: {len(graphs)} int8 {stage} graph(s) for {len(names)} member(s)")
    for name, graph in zip(names, graphs):
        data = graph if isinstance(graph, bytes) else Path(graph).read_bytes()
        (tmp / name / INT8_GRAPH).write_bytes(data)
    return graphs


def _copy_reports(tmp: Path, report_files: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Copy ``report_files`` into ``tmp/report/``; return their paths inside the folder, as ``cascade.json`` lists
    them."""
    reports = []
    for report in report_files:
        src = Path(report)
        (tmp / REPORT_DIR).mkdir(exist_ok=True)
        shutil.copyfile(src, tmp / REPORT_DIR / src.name)
        reports.append(f"{REPORT_DIR}/{src.name}")
    return reports


def read_model_dir(directory: str | os.PathLike[str]) -> ModelDir:
    """Read and verify a MODEL_DIR: schema version, every listed file present and inside it, every config's sha256
    and fields; the weights' sha256 is checked as :meth:`ModelDir.load` reads them."""
    root = Path(directory)
    path = root / MANIFEST
    if not root.is_dir():
        raise ModelError(f"{root}: not a folder (a model folder holds {MANIFEST}, classifier/ and segmenter/)")
    manifest = read_json_object(path, f"is {root} a model folder written by 'cascade tune'?")
    thresholds, tta, precision = _read_settings(manifest, path)
    members = _get(manifest, "members", dict, path)
    hashes = _get(manifest, "sha256", dict, path)
    recorded_preps = _get(manifest, "preprocessing", dict, path)
    metrics = _get(manifest, "metrics", dict, path)
    versions = _get(manifest, "versions", dict, path)
    stage_dirs: dict[str, list[Path]] = {}
    configs: dict[Path, dict[str, Any]] = {}
    weight_hashes: dict[Path, str] = {}
    int8_hashes: dict[Path, str] = {}
    preprocessing: dict[str, Preprocessing] = {}
    for stage in STAGES:
        dirs = []
        for name in _member_names(members, stage, path):
            configs[root / name], weight_hashes[root / name], int8 = _read_member(
                root, name, stage, hashes, path, precision
            )
            if int8 is not None:
                int8_hashes[root / name] = int8
            dirs.append(root / name)
        stage_dirs[stage] = dirs
        preprocessing[stage] = _checked_preprocessing([configs[d] for d in dirs], stage, root, recorded_preps, path)
    return ModelDir(
        root=root,
        thresholds=thresholds,
        tta=tta,
        classifiers=stage_dirs["classifier"],
        segmenters=stage_dirs["segmenter"],
        preprocessing=preprocessing,
        metrics=metrics,
        versions=versions,
        precision=precision,
        configs=configs,
        sha256=weight_hashes,
        int8_sha256=int8_hashes,
        weights_sha256=weights_digest(hashes),
    )


def _read_settings(manifest: dict[str, Any], path: Path) -> tuple[Thresholds, bool, str]:
    """The schema version checked first (nothing else is read from a version this cascade does not know), then the
    thresholds, ``tta.hflip`` and the tuned precision (``fp32`` when absent: folders from before it was recorded)."""
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ModelError(
            f"{path}: schema_version {version!r} is not supported (this cascade {__version__} reads {SCHEMA_VERSION})"
        )
    try:
        thresholds = Thresholds.from_dict(_get(manifest, "thresholds", dict, path), where=str(path))
    except CascadeError as err:
        raise ModelError(str(err)) from None
    tta = _get(manifest, "tta", dict, path).get("hflip", False)
    if not isinstance(tta, bool):
        raise ModelError(f"{path}: tta.hflip must be true or false, got {tta!r}")
    precision = manifest.get("precision", "fp32")
    if precision not in TUNED_PRECISIONS:
        raise ModelError(f"{path}: precision must be one of {', '.join(TUNED_PRECISIONS)}, got {precision!r}")
    return thresholds, tta, precision


def _member_names(members: dict[str, Any], stage: str, path: Path) -> list[str]:
    """The member folder names ``cascade.json`` lists for ``stage``, which must be a non-empty list of strings."""
    names = members.get(stage)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ModelError(f"{path}: members.{stage} must be a non-empty list of folder names")
    return names


def _read_member(
    root: Path, name: str, stage: str, hashes: dict[str, Any], path: Path, precision: str
) -> tuple[dict[str, Any], str, str | None]:
    """One listed member verified: a plain folder name (so it lies directly in ``root``), its config and recorded
    weights sha256 (:func:`_verify_member`) and, tuned at int8, its graph present with a recorded sha256 (else None)."""
    if Path(name).name != name or name in ("", ".", ".."):
        raise ModelError(f"{path}: member {name!r} must be a folder name inside the model folder")
    config, weights_sha256 = _verify_member(root, name, stage, hashes, path)
    int8 = None
    if precision == "int8":
        int8 = _recorded_sha256(root, name, INT8_GRAPH, hashes, path)
        if path_kind(root / name / INT8_GRAPH) != "file":
            raise ModelError(f"{root / name / INT8_GRAPH}: missing")
    return config, weights_sha256, int8


def _checked_preprocessing(
    configs: list[dict[str, Any]], stage: str, root: Path, recorded_preps: dict[str, Any], path: Path
) -> Preprocessing:
    """The stage's preprocessing from its members' configs, which ``cascade.json``'s copy (when present) must
    match: the configs are what the networks were trained with, so an edited manifest cannot change the input."""
    preprocessing = _stage_preprocessing(configs, stage, root)
    recorded = recorded_preps.get(stage)
    if recorded is not None and recorded != preprocessing.to_dict():
        raise ModelError(
            f"{path}: preprocessing.{stage} {recorded} differs from what the {stage} was trained with "
            f"({preprocessing.to_dict()} in its {CONFIG})"
        )
    return preprocessing


def _get(manifest: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    value = manifest.get(key)
    if not isinstance(value, kind):
        raise ModelError(f"{path}: key {key!r} is missing or not a JSON {kind.__name__}")
    return value


def _verify_member(
    root: Path, name: str, stage: str, hashes: dict[str, Any], manifest: Path
) -> tuple[dict[str, Any], str]:
    """A member folder must lie inside ``root``, hold a config (of the right stage, sha256 as recorded, every field
    valid) and a weight file with a recorded sha256; returns the config and that sha256."""
    _check_inside(root, root / name)
    recorded = {file: _recorded_sha256(root, name, file, hashes, manifest) for file in (CONFIG, WEIGHTS)}
    config_path = root / name / CONFIG
    data = read_json_bytes(config_path, f"a stage folder needs {CONFIG} and {WEIGHTS}")
    if hashlib.sha256(data).hexdigest() != recorded[CONFIG]:
        raise ModelError(f"{config_path}: sha256 does not match {MANIFEST}: the file was edited or truncated")
    config = parse_json_object(data, config_path)
    if config.get("stage") != STAGES[stage]:
        raise ModelError(f"{config_path}: stage {config.get('stage')!r}, expected {STAGES[stage]!r}")
    validate_config(config, config_path)
    weights = root / name / WEIGHTS
    if path_kind(weights) != "file":
        raise ModelError(f"{weights}: missing")
    return config, recorded[WEIGHTS]


def _check_inside(root: Path, path: Path) -> None:
    if not os.path.realpath(path).startswith(os.path.realpath(root) + os.sep):
        raise ModelError(f"{path}: leads outside the model folder (a symlink); refusing to read it")


def _recorded_sha256(root: Path, name: str, file: str, hashes: dict[str, Any], manifest: Path) -> str:
    """The sha256 ``cascade.json`` records for ``name/file``, a path that must not lead outside ``root``."""
    _check_inside(root, root / name / file)
    expected = hashes.get(f"{name}/{file}")
    if not isinstance(expected, str):
        raise ModelError(
            f"{manifest}: no sha256 recorded for {name}/{file} (written by an older cascade? run 'cascade tune' again)"
        )
    return expected


def _stage_preprocessing(configs: list[dict[str, Any]], stage: str, where: Path) -> Preprocessing:
    """The preprocessing every member of a stage was trained with (members must agree: one input per stage)."""
    preps = []
    for config in configs:
        if not isinstance(config.get("preprocessing"), dict):
            raise ModelError(f"{where}: a {stage} {CONFIG} has no 'preprocessing' (size, mean, std)")
        try:
            preps.append(Preprocessing.from_dict(config["preprocessing"]))
        except (CascadeError, TypeError) as err:
            raise ModelError(f"{where}: {stage} {CONFIG} has bad preprocessing ({err})") from None
    if any(p != preps[0] for p in preps[1:]):
        raise ModelError(f"{where}: the {stage} members were trained with different preprocessing {preps}")
    return preps[0]


def _write_member(folder: Path, source: Member, stage: str) -> dict[str, Any]:
    """Copy a stage folder (or save a ``(model, config)``) into ``folder``; return its config."""
    if isinstance(source, tuple):
        model, config = source
        config = dict(config)
        save_stage(folder, model, config)
    else:
        src = Path(source)
        config = read_config(src)
        if not (src / WEIGHTS).is_file():
            raise ModelError(f"{src / WEIGHTS}: missing")
        folder.mkdir(parents=True)
        shutil.copyfile(src / WEIGHTS, folder / WEIGHTS)
        shutil.copyfile(src / CONFIG, folder / CONFIG)
    if config.get("stage") != STAGES[stage]:
        raise ModelError(f"{folder.name}: a {stage} member has stage {config.get('stage')!r}")
    return config


def check_replaceable(target: Path) -> None:
    """Refuse to overwrite anything but an existing model folder or an empty folder (callers check before work)."""
    if target.exists() and not (
        target.is_dir() and ((target / MANIFEST).is_file() or not any(target.iterdir()))
    ):
        raise ModelError(f"{target}: exists and is not a model folder; refusing to replace it")


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` onto ``target``; an old model folder is moved aside first and removed only afterwards."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
