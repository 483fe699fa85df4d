"""Issue 11: no hang, no traceback, no silent wrong answer, no lost output, under bad inputs and signals.

One test (or group) per numbered item of the issue, each reproducing the case as a user meets it, then the fault
sweep: every command against a small corpus of bad inputs. docs/robustness.md lists what each bad input gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import stat
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_refused_when_damaged, make_model_dir
from pydicom import dcmread
from robust_helpers import (
    ROOT,
    alive,
    assert_one_line_error,
    cascade,
    children,
    finish,
    start,
    unprivileged,
    wait_until,
)

from cascade.cli.main import main
from cascade.data.labels import read_labels
from cascade.data.synth import SynthSummary, generate
from cascade.errors import CascadeError, ConfigError, ImageError
from cascade.inference.pipeline import Cascade
from cascade.storage.modeldir import MANIFEST

CONFIGS = ROOT / "cascade" / "configs"


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    return generate(tmp_path_factory.mktemp("synth"), images=8, positive_fraction=0.5, size=64, seed=3,
                    progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("m") / "model")


@pytest.fixture
def no_hang() -> Iterator[None]:
    """Fail (instead of hanging the suite) when the test blocks for a minute, e.g. on opening a FIFO."""

    def timeout(signum: int, frame: object) -> None:
        raise TimeoutError("blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def dicoms(synth: SynthSummary, folder: Path, count: int = 2) -> list[Path]:
    """Copies of the first ``count`` synthetic DICOMs in ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, folder)) for p in sorted(synth.paths.values())[:count]]


def predict(model_dir: Path, *inputs: object, out: Path, extra: tuple[str, ...] = ()) -> int:
    return main(["predict", str(model_dir), *map(str, inputs), "--out", str(out), "--device", "cpu",
                 "--workers", "0", *extra])


def error_lines(err: str, command: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith(f"cascade {command}: ")]


# ---------------------------------------------------------------------------------------------------- 1. files


def test_fifo_inside_an_input_folder_is_skipped_unopened(
    synth: SynthSummary, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_hang: None
) -> None:
    folder = tmp_path / "in"
    good = dicoms(synth, folder)
    os.mkfifo(folder / "stuck.dcm")  # nobody ever writes to it: opening it would block for ever
    out = tmp_path / "sub.csv"
    assert predict(model_dir, folder, out=out) == 0
    err = capsys.readouterr().err
    assert "1 *.dcm entries are not regular files" in err and "stuck.dcm" in err
    assert sorted(read_labels(out).image_ids) == sorted(p.stem for p in good)


def test_unreadable_sub_folder_is_reported_and_predict_exits_2(
    synth: SynthSummary, model_dir: Path, tmp_path: Path
) -> None:
    prefix = unprivileged()
    tmp_path.chmod(0o777)
    folder = tmp_path / "in"
    dicoms(synth, folder, 1)
    dicoms(synth, folder / "locked", 1)
    (folder / "locked").chmod(0)
    out = tmp_path / "sub.csv"
    try:
        result = cascade(["predict", model_dir, folder, "--out", out, "--device", "cpu", "--workers", "0"],
                         prefix=prefix)
    finally:
        (folder / "locked").chmod(0o755)
    assert result.returncode == 2, result.stderr
    assert "warning: 1 sub-folder(s) could not be read" in result.stderr and "locked" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(read_labels(out)) == 1


@pytest.mark.parametrize("kind", ["fifo", "loop"])
def test_fifo_or_symlink_loop_named_directly_is_said_to_be_one(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, no_hang: None
) -> None:
    path = tmp_path / "x.dcm"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(tmp_path / "y.dcm")
        (tmp_path / "y.dcm").symlink_to(path)
    assert predict(model_dir, path, out=tmp_path / "s.csv") == 2
    (line,) = error_lines(capsys.readouterr().err, "predict")
    assert ("a FIFO" if kind == "fifo" else "a symlink loop") in line and "no such" not in line
    assert not (tmp_path / "s.csv").exists()


def _readers() -> dict[str, Callable[[Path], object]]:
    from cascade.data.dicom import read_dicom, read_patient_key
    from cascade.data.index import scan_dicoms
    from cascade.data.splits import read_split_csv
    from cascade.stages.checkpoint import read_config
    from cascade.stages.config import read_yaml

    return {"read_dicom": read_dicom, "read_patient_key": read_patient_key, "read_labels": read_labels,
            "read_split_csv": read_split_csv, "read_yaml": read_yaml, "scan_dicoms": scan_dicoms,
            "from_pretrained": Cascade.from_pretrained, "read_config": lambda p: read_config(p.parent)}


@pytest.mark.parametrize("reader", sorted(_readers()))
def test_library_readers_refuse_a_fifo_at_once(tmp_path: Path, reader: str, no_hang: None) -> None:
    fifo = tmp_path / ("config.json" if reader == "read_config" else "input")
    os.mkfifo(fifo)
    with pytest.raises(CascadeError, match="FIFO|not a folder") as err:
        _readers()[reader](fifo)
    assert str(err.value).startswith(f"{fifo}: ")


# ---------------------------------------------------------------------------------------------------- 2. outputs


def test_output_paths_are_checked_before_any_work(synth: SynthSummary, model_dir: Path, tmp_path: Path) -> None:
    prefix = unprivileged()
    tmp_path.chmod(0o777)
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    image = dicoms(synth, tmp_path / "in", 1)[0]
    result = cascade(["predict", model_dir, image, "--out", locked / "sub.csv"], prefix=prefix, timeout=60)
    assert_one_line_error(result, "read-only/sub.csv", "no write permission")
    assert "torch" not in result.stderr  # refused before the model was even loaded
    before = image.read_bytes(), {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    for out in (image, model_dir / "classifier" / "config.json", model_dir / "new.csv"):
        assert main(["predict", str(model_dir), str(image), "--out", str(out)]) == 2
    assert before == (image.read_bytes(), {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()})
    assert not (model_dir / "new.csv").exists()


# ---------------------------------------------------------------------------------------------------- 3. ImageIds


def test_an_image_id_with_a_comma_costs_only_that_image(
    synth: SynthSummary, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    good = dicoms(synth, folder, 1)[0]
    shutil.copy(good, folder / "left,right.dcm")
    shutil.copy(good, folder / 'say "hi".dcm')
    out = tmp_path / "sub.csv"
    assert predict(model_dir, folder, out=out) == 2
    err = capsys.readouterr().err
    failed = [line for line in error_lines(err, "predict") if "failed:" in line]
    assert len(failed) == 2 and all("cannot be a submission row" in line for line in failed)
    assert out.read_text().splitlines()[1:] == [f"{good.stem},{read_labels(out).annotations[good.stem][0]}"
                                                if read_labels(out).is_positive(good.stem) else f"{good.stem},-1"]


# ---------------------------------------------------------------------------------------------------- 4. workers


def _train(data: Path, out: Path, *extra: str, labels: Path | None = None) -> int:
    return main(["train", "--stage", "seg", "--images", str(data / "dicom-images-train"),
                 "--labels", str(labels or data / "train-rle.csv"), "--out", str(out),
                 "--config", str(CONFIGS / "tiny-seg.yaml"), "--quiet", *extra])


def test_decode_error_in_a_loader_worker_is_one_line(
    synth: SynthSummary, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    shutil.copytree(synth.labels.parent, data, ignore=shutil.ignore_patterns("cache*"))
    victims = sorted((data / "dicom-images-train").rglob("*.dcm"))
    for victim in victims:  # the headers are fine: only decoding fails, in a loader worker
        ds = dcmread(victim)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        ds.save_as(victim)
    status = _train(data, tmp_path / "run", "--workers", "1", "--no-cache", "--epochs", "1")
    (line,) = error_lines(capsys.readouterr().err, "train")
    assert status == 2 and "cannot decode the JPEG Baseline" in line and "worker" not in line
    assert any(line.startswith(f"cascade train: error: {victim}: ") for victim in victims)


def test_label_past_the_image_edge_is_refused_before_caching(
    synth: SynthSummary, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.csv"
    rows = synth.labels.read_text().splitlines()
    first_positive = next(i for i, r in enumerate(rows) if i and not r.endswith("-1"))
    image_id = rows[first_positive].split(",")[0]
    rows[first_positive] = f"{image_id}, 4000 200"  # 64x64 image: pixel 4200 > 4096
    labels.write_text("\n".join(rows) + "\n")
    cache = tmp_path / "cache"
    status = _train(synth.labels.parent, tmp_path / "run", "--cache-dir", str(cache), labels=labels)
    (line,) = error_lines(capsys.readouterr().err, "train")
    assert status == 2 and f"row {first_positive + 1}" in line and "runs past the end of the 64x64 image" in line
    assert not cache.exists() and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------- 5. numbers


@pytest.mark.parametrize(("slope", "intercept"), [("1e308", "0"), ("1", "1e308")])
def test_rescale_overflow_is_a_dicom_error_not_a_black_image(
    synth: SynthSummary, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], slope: str,
    intercept: str,
) -> None:
    folder = tmp_path / "in"
    good, bad = dicoms(synth, folder, 2)
    ds = dcmread(bad)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.save_as(bad)
    out = tmp_path / "sub.csv"
    assert predict(model_dir, folder, out=out) == 2
    err = capsys.readouterr().err
    assert f"{bad}: the modality LUT" in err and "non-finite" in err
    assert "RuntimeWarning" not in err and "overflow encountered" not in err  # numpy's two-line noise is silenced
    assert read_labels(out).image_ids == [good.stem]


@pytest.mark.parametrize("array", [np.zeros((0, 0), np.float32), np.zeros((0, 5), np.uint8),
                                   np.full((8, 8), np.nan, np.float32), np.full((8, 8), np.inf, np.float32)],
                         ids=["0x0", "0x5", "nan", "inf"])
def test_empty_or_non_finite_array_is_refused(model_dir: Path, array: np.ndarray) -> None:
    model = Cascade.from_pretrained(model_dir, device="cpu")
    with pytest.raises(ImageError, match="image array"):  # an input error, not a configuration error
        model.predict(array)


# ---------------------------------------------------------------------------------------------------- 6. signals


def _many_inputs(synth: SynthSummary, folder: Path, count: int) -> Path:
    """``count`` DICOMs (links to one synthetic file, each its own ImageId): enough work to be signalled mid-run."""
    folder.mkdir()
    source = min(synth.paths.values())
    for i in range(count):
        (folder / f"1.2.3.{i}.dcm").symlink_to(source)
    return folder


def _signal_mid_run(proc: Any, args: list[Any], sig: signal.Signals) -> Any:
    """Once ``proc`` runs its loader workers, send it ``sig``; its result, after checking that no worker (nor any
    other process of its group) is alive 5 s later."""
    assert wait_until(lambda: len(children(proc.pid)) >= 2 or proc.poll() is not None, 90), "no workers"
    assert proc.poll() is None, proc.communicate()
    workers = children(proc.pid)
    os.kill(proc.pid, sig)
    result = finish(proc, args, timeout=30)  # also: nothing of its process group left after 5 s
    assert wait_until(lambda: not any(alive(w) for w in workers), 5.0), "a worker outlived its parent"
    return result


@pytest.mark.parametrize("command", ["predict", "train"])
def test_sigterm_and_sigkill_leave_no_worker_behind(
    synth: SynthSummary, model_dir: Path, tmp_path: Path, command: str
) -> None:
    runs = {}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        where = tmp_path / sig.name
        where.mkdir()
        if command == "predict":
            out = where / "sub.csv"
            args = ["predict", model_dir, _many_inputs(synth, where / "in", 3000), "--out", out, "--device", "cpu",
                    "--workers", "2", "--batch-size", "1"]
        else:
            out = where / "run"
            args = ["train", "--stage", "seg", "--images", synth.labels.parent / "dicom-images-train",
                    "--labels", synth.labels, "--out", out, "--config", CONFIGS / "tiny-seg.yaml",
                    "--epochs", "500", "--workers", "2", "--no-cache", "--batch-size", "2",
                    "--quiet"]
        runs[sig] = (start(args), args, out)
    for sig, (proc, args, out) in runs.items():
        result = _signal_mid_run(proc, args, sig)
        if sig == signal.SIGTERM:
            assert result.returncode == 143 and result.stderr.strip().splitlines()[-1] == f"cascade {command}: terminated"
            assert "Traceback" not in result.stderr, result.stderr
        else:
            assert result.returncode == -signal.SIGKILL
        if command == "predict":
            assert not out.exists()
        leftovers = [p for p in out.parent.rglob(".*") if p.name.endswith(".tmp")]
        assert not leftovers, leftovers


# ---------------------------------------------------------------------------------------------------- 7. configs


def _rehash(root: Path, member: str = "classifier") -> None:
    """Record the member's current config.json sha256 in cascade.json (an edit a checksum alone cannot catch)."""
    manifest = json.loads((root / MANIFEST).read_text())
    data = (root / member / "config.json").read_bytes()
    manifest["sha256"][f"{member}/config.json"] = hashlib.sha256(data).hexdigest()
    (root / MANIFEST).write_text(json.dumps(manifest))


def _edit_config(root: Path, rehash: bool = True, **changes: Any) -> None:
    path = root / "classifier" / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if key in ("size", "mean", "std"):
            config["preprocessing"][key] = value
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    if rehash:
        _rehash(root)


def _escape(root: Path) -> None:
    outside = root.parent / "elsewhere"
    shutil.move(root / "classifier", outside)
    (root / "classifier").symlink_to(outside)


def _nested(root: Path) -> None:
    (root / "classifier" / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    _rehash(root)


def _no_config_hash(root: Path) -> None:
    manifest = json.loads((root / MANIFEST).read_text())
    del manifest["sha256"]["classifier/config.json"]
    (root / MANIFEST).write_text(json.dumps(manifest))


def _manifest_dir(root: Path) -> None:
    (root / MANIFEST).unlink()
    (root / MANIFEST).mkdir()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: _edit_config(d, rehash=False, pool="max"), "classifier/config.json: sha256 does not match"),
        (lambda d: _edit_config(d, in_chans="abc"), "in_chans must be the integer 1"),
        (lambda d: _edit_config(d, model=123), "model must be a network name"),
        (lambda d: _edit_config(d, size=16.5), "image size must be an integer"),
        (lambda d: _edit_config(d, mean=float("nan")), "mean must be a finite number"),
        (lambda d: _edit_config(d, std=0), "std must be positive"),
        (lambda d: _edit_config(d, pool="median"), "pool must be one of"),
        (lambda d: _edit_config(d, model="vit_huge_patch14_224"), "weights do not fit the network"),
        (_nested, "nested too deeply"),
        (_manifest_dir, "cascade.json: is a folder"),
        (_escape, "leads outside the model folder"),
        (_no_config_hash, "no sha256 recorded for classifier/config.json"),
    ],
    ids=["edited", "in_chans", "model", "size", "mean", "std", "pool", "huge", "nested", "manifest-dir", "symlink",
         "unhashed"],
)
def test_tampered_model_folder_is_one_model_error(model_dir: Path, tmp_path: Path, damage: Any, message: str) -> None:
    assert_refused_when_damaged(model_dir, tmp_path, damage, message)


# ---------------------------------------------------------------------------------------------------- 8. PHI


def test_header_values_never_reach_the_terminal(
    synth: SynthSummary, model_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    colour, odd_uid = dicoms(synth, folder, 2)
    with warnings.catch_warnings():  # pydicom warns (quoting the value) already when the test writes it
        warnings.simplefilter("ignore")
        ds = dcmread(colour)
        ds.PhotometricInterpretation = "Doe^John"
        ds.save_as(colour)
        ds = dcmread(odd_uid)
        ds.StudyInstanceUID = "Doe^John"  # pydicom warns about an invalid UI value by quoting it
        ds.save_as(odd_uid)
    out = tmp_path / "sub.csv"
    assert predict(model_dir, folder, out=out) == 2
    captured = capfd.readouterr()
    assert "Doe" not in captured.err + captured.out and "John" not in captured.err + captured.out
    assert f"{colour}: " in captured.err and "PhotometricInterpretation" in captured.err
    assert read_labels(out).image_ids == [odd_uid.stem]


# ---------------------------------------------------------------------------------------------------- 9. small ones


def test_unsafe_state_pt_error_gives_no_unsafe_advice(
    synth: SynthSummary, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from cascade.stages import config as cfg
    from cascade.storage.rundir import CONFIG_FILE, STATE_FILE

    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG_FILE).write_text(cfg.to_yaml(cfg.resolve("seg", str(CONFIGS / "tiny-seg.yaml"), {})))
    torch.save({"epoch": 1, "opaque": ConfigError("an arbitrary object")}, run / STATE_FILE)
    assert _train(synth.labels.parent, run, "--resume") == 2
    (line,) = error_lines(capsys.readouterr().err, "train")
    assert f"{run / STATE_FILE}: not a readable training state" in line and "weights_only" not in line


def test_run_folder_files_get_normal_permissions(tmp_path: Path) -> None:
    from conftest import SEG_CONFIG, tiny_stage

    from cascade.stages.checkpoint import save_stage

    save_stage(tmp_path / "best", *tiny_stage(SEG_CONFIG, seed=0))
    umask = os.umask(0)
    os.umask(umask)
    for file in (tmp_path / "best").iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file


def test_a_gigabyte_line_is_refused_without_reading_it(tmp_path: Path) -> None:
    huge = tmp_path / "huge.csv"
    with open(huge, "wb") as f:
        f.write(b"ImageId,EncodedPixels\n1.2.3,")
        f.truncate(1 << 30)  # sparse: one 1 GiB line of NULs, no disk used

    def cap_memory() -> None:  # reading the line whole (the old way) needs over 2 GiB
        resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))

    result = cascade(["evaluate", huge, "--labels", huge], timeout=60, preexec_fn=cap_memory)
    assert_one_line_error(result, f"{huge}:line 2: longer than")


# ---------------------------------------------------------------------------------------------------- sweep


def _corpus(root: Path, synth: SynthSummary, model_dir: Path) -> list[tuple[list[Any], Path | None, str]]:
    """(arguments, the output that must not appear or change, a phrase of the error) per bad input."""
    fifo, file, loop, missing = root / "fifo.csv", root / "file.txt", root / "loop.dcm", root / "nothere"
    os.mkfifo(fifo)
    file.write_text("a user's file\n")
    loop.symlink_to(loop)
    new = root / "new"
    images, labels = synth.labels.parent / "dicom-images-train", synth.labels
    image = min(synth.paths.values())
    tampered = root / "tampered"
    shutil.copytree(model_dir, tampered)
    _edit_config(tampered, rehash=False, std=1e-30)
    bad_labels = root / "bad.csv"
    bad_labels.write_text("ImageId,EncodedPixels\n1.2.3,1 2 3\n")
    train = ["train", "--stage", "seg", "--config", CONFIGS / "tiny-seg.yaml"]
    return [  # the two that import torch first: they take longest
        ([*train, "--images", images, "--labels", bad_labels, "--out", new], new, "odd number of values"),
        (["predict", tampered, image, "--out", new], new, "sha256 does not match"),
        (["synth", file], file, "is a file"),
        (["synth", file / "sub"], file, "is not a folder"),
        (["synth", new, "--mask-bank", fifo], new, "a FIFO"),
        (["synth", new, "--mask-bank", missing], new, "no such label file"),
        ([*train, "--images", missing, "--labels", labels, "--out", new], new, "no such folder of images"),
        ([*train, "--images", fifo, "--labels", labels, "--out", new], new, "a FIFO"),
        ([*train, "--images", images, "--labels", fifo, "--out", new], new, "a FIFO"),
        ([*train, "--images", images, "--labels", labels, "--out", file], file, "is a file"),
        (["train", "--stage", "seg", "--config", fifo, "--images", images, "--labels", labels, "--out", new], new,
         "a FIFO"),
        (["tune", "--cls", missing, "--seg", missing, "--out", new], new, "no such run folder"),
        (["tune", "--cls", model_dir, "--seg", model_dir, "--out", file], file, "is a file"),
        (["tune", "--cls", model_dir, "--seg", model_dir, "--out", model_dir / "x"], None, "lies inside"),
        (["predict", missing, image, "--out", new], new, "no such model folder"),
        (["predict", model_dir, fifo, "--out", new], new, "a FIFO"),
        (["predict", model_dir, loop, "--out", new], new, "a symlink loop"),
        (["predict", model_dir, image, "--out", root], None, "is a folder"),
        (["predict", model_dir, image, "--out", file / "sub.csv"], file, "is not a folder"),
        (["predict", model_dir, image, "--out", image], None, "one of this command's inputs"),
        (["predict", model_dir, image, "--out", model_dir / "sub.csv"], None, "lies inside"),
        (["predict", model_dir, image, "--out", new, "--overlays", file], file, "is a file"),
        (["evaluate", missing, "--labels", labels], None, "no such label file"),
        (["evaluate", labels, "--labels", fifo], None, "a FIFO"),
        (["evaluate", labels, "--labels", bad_labels], None, "odd number of values"),
        (["evaluate", labels, "--labels", labels, "--report", file], file, "is a file"),
        (["export", missing, "--format", "onnx", "--out", new], new, "no such model folder"),
        (["export", model_dir, "--format", "onnx", "--out", file], file, "is a file"),
        (["export", model_dir, "--format", "onnx", "--out", model_dir], None, "lies inside"),
        (["predict", model_dir, "--out", new], new, "required: INPUT"),
        (["evaluate", labels, "--labels", labels, "--size", "x", "1"], None, "invalid int value"),
        (["demo", "--out", file], file, "is a file"),
        (["demo", "--out", file / "sub"], file, "is not a folder"),
    ]


def test_fault_sweep_every_command_fails_cleanly(synth: SynthSummary, model_dir: Path, tmp_path: Path) -> None:
    """Each command against bad inputs: exit 2, one line ``cascade <cmd>: error: …``, no traceback, no output
    under its final name (a user's file unchanged), no process left (checked by ``cascade``)."""
    corpus = _corpus(tmp_path, synth, model_dir)
    before = {out: out.read_bytes() for _, out, _ in corpus if out is not None and out.is_file()}
    model_files = {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    assert {args[0] for args, _, _ in corpus} == {"synth", "train", "tune", "predict", "evaluate", "export", "demo"}
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda case: cascade(case[0], timeout=120), corpus))
    for (args, out, phrase), result in zip(corpus, results):
        assert_one_line_error(result, phrase)
        if out is not None:
            assert (out.read_bytes() == before[out]) if out in before else not out.exists(), args
    assert model_files == {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    assert not list(tmp_path.rglob(".*.tmp"))
