"""Atomic file writes: a reader never sees a half-written output, and a crash leaves the old file in place."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_PENDING: set[Path] = set()
"""Temporary files and folders of writes in progress: what :func:`remove_pending` deletes when a signal ends the
process before their ``finally`` blocks can run."""


@contextmanager
def pending(path: Path) -> Iterator[Path]:
    """Register ``path`` (a temporary file or folder) as in progress for the duration of the block."""
    _PENDING.add(path)
    try:
        yield path
    finally:
        _PENDING.discard(path)


def remove_pending() -> None:
    """Delete every temporary file and folder of a write in progress (called on SIGTERM, just before exiting)."""
    import shutil

    for path in list(_PENDING):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _default_mode() -> int:
    """Permissions a plain ``open(path, "w")`` would give: 0o666 less the process umask (mkstemp gives 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    with pending(Path(tmp_name)) as tmp:
        try:
            yield tmp
            os.chmod(tmp, _default_mode())  # after the block: a writer may replace the file (safetensors gives 0600)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


JSON_LIMIT = 16 << 20
"""Largest JSON file cascade reads (its own are kilobytes): a bigger one is refused before it is read."""


def read_json_object(path: str | os.PathLike[str], missing: str) -> dict[str, Any]:
    """Read a JSON object from ``path``; ``ModelError`` naming the file when missing (with ``missing`` as the hint),
    not a regular file, too large, malformed, nested too deeply, or not an object."""
    return parse_json_object(read_json_bytes(path, missing), path)


def read_json_bytes(path: str | os.PathLike[str], missing: str) -> bytes:
    """The bytes of a JSON file cascade wrote (checked as :func:`read_json_object` says), for hashing and parsing."""
    from cascade.errors import ModelError

    if path_kind(path) == "missing":
        raise ModelError(f"{path}: missing ({missing})")
    file = input_file(path, ModelError)
    try:
        with open(file, "rb") as fh:
            data = fh.read(JSON_LIMIT + 1)
    except OSError as err:
        raise ModelError(f"{path}: cannot read ({err.strerror or type(err).__name__})") from None
    if len(data) > JSON_LIMIT:
        raise ModelError(f"{path}: larger than {JSON_LIMIT >> 20} MiB; not a file cascade writes")
    return data


def parse_json_object(data: bytes, path: str | os.PathLike[str]) -> dict[str, Any]:
    """``data`` parsed as a JSON object; ``ModelError`` naming ``path`` otherwise."""
    from cascade.errors import ModelError

    try:
        obj = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise ModelError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return obj


_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
            (stat.S_ISBLK, "a device"))


def path_kind(path: str | os.PathLike[str]) -> str:
    """What ``path`` is, found with ``stat`` only (a FIFO is never opened): ``"file"``, ``"folder"``, ``"missing"``,
    or a phrase for anything else (``"a FIFO (named pipe)"``, ``"a symlink loop"``, ``"a broken symlink"``, …)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symlink" if os.path.islink(path) else "missing"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symlink loop"
        if err.errno == errno.ENOTDIR:
            return "missing"
        return f"not accessible ({err.strerror or type(err).__name__})"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    return next((name for test, name in _SPECIAL if test(mode)), "not a regular file")


def input_file(
    path: str | os.PathLike[str], error: type[Exception] | None = None, what: str = "file", *, folder: bool = False
) -> Path:
    """``path`` if it is a regular file (a folder with ``folder=True``); else ``error`` (a ``CascadeError`` class)
    naming it and saying what it is instead.

    Checked with ``stat`` before any ``open``: opening a FIFO would block until someone writes to it. Commands call
    this on their inputs before importing torch, so a mistyped path is refused at once.
    """
    from cascade.errors import CascadeError

    kind = path_kind(path)
    wanted = "folder" if folder else "file"
    if kind == wanted:
        return Path(path)
    if kind == "missing":
        reason = f"no such {what}"
    elif kind in ("file", "folder"):
        reason = f"is a {kind}, not a {what}"
    elif kind.startswith("not accessible"):
        reason = f"is {kind}"
    else:
        reason = f"is {kind}, not a {'' if folder else 'regular '}{what}"
    raise (error or CascadeError)(f"{path}: {reason}")


def check_output(
    path: str | os.PathLike[str],
    *,
    folder: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
    inside: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Refuse, before any work starts, an output that cannot be written or would overwrite what the command reads.

    ``path`` is a file to write (``folder=False``) or a folder to create or fill. It must not be the other kind of
    thing (nor a FIFO, socket or device), its nearest existing parent must be a writable folder, it must not be
    any of ``inputs``, and it must not be or lie inside any folder of ``inside`` (a MODEL_DIR it reads, ...).
    Every command that writes calls this first; the failures are ``CascadeError`` (exit 2).
    """
    from cascade.errors import CascadeError

    target = Path(path)
    kind = path_kind(target)
    wanted = "folder" if folder else "file"
    if kind == ("file" if folder else "folder"):
        raise CascadeError(f"{target}: is a {kind}; expected a {wanted} to write")
    if kind not in ("missing", wanted):
        raise CascadeError(f"{target}: is {kind}; expected a {wanted} to write")
    real = os.path.realpath(target)
    for source in inputs:
        if real == os.path.realpath(source):
            raise CascadeError(f"{target}: is one of this command's inputs; refusing to overwrite it")
    for protected in inside:
        root = os.path.realpath(protected)
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            raise CascadeError(f"{target}: lies inside {protected}, which this command reads; write elsewhere")
    existing = target if kind == "folder" else target.absolute().parent
    while path_kind(existing) == "missing" and existing != existing.parent:
        existing = existing.parent
    if path_kind(existing) != "folder":
        raise CascadeError(f"{target}: cannot be created: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CascadeError(f"{target}: cannot be written: no write permission in {existing}")
    return target


def durable_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and flush it to the disk (file and folder entry) before returning.

    For what a service acknowledges or records: after this returns, a crash or power cut keeps the whole file.
    """
    target = Path(path)
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    sync_folder(target.parent)
    return target


def sync_folder(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a file just created, renamed or linked there) to the disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
