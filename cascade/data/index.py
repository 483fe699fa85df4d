"""Finding DICOM files and matching them to labels by ImageId (the file name without ``.dcm``).

Folders are scanned recursively for ``*.dcm`` in any letter case; hidden files and folders (``._x.dcm`` from
macOS, ``.git``) and files without that extension (``DICOMDIR``, notes) are skipped. A file named explicitly is
taken whatever its name: its ImageId is the name without a ``.dcm`` suffix, never cut at another dot
(SOPInstanceUIDs are dotted). Only regular files are taken, found with ``stat`` (a FIFO, socket or device named
``*.dcm`` is skipped, never opened); a sub-folder that cannot be listed is counted in ``unreadable_folders``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cascade.data.labels import Labels
from cascade.errors import CascadeError
from cascade.storage.fileio import path_kind

SUFFIX = ".dcm"
UNREADABLE_FOLDERS = "sub-folder(s) could not be read (permission denied?); the images in them are missing"
"""The warning about folders that could not be listed (``predict`` exits 2 after it: images are missing)."""


@dataclass
class DicomIndex:
    """ImageId -> path, sorted by ImageId; ``duplicates`` holds the other paths of an ImageId found twice or more."""

    paths: dict[str, Path]
    duplicates: dict[str, list[Path]] = field(default_factory=dict)
    unreadable_folders: list[Path] = field(default_factory=list)
    """Sub-folders that could not be listed (permissions): the images in them are missing from ``paths``."""
    special_files: list[Path] = field(default_factory=list)
    """``*.dcm`` entries that are not regular files (FIFOs, sockets, devices, broken links): skipped unopened."""

    def __len__(self) -> int:
        return len(self.paths)

    def warnings(self) -> list[str]:
        """One line per kind of skipped entry (counts and the first path), for the commands to print."""
        lines = []
        special = "*.dcm entries are not regular files (FIFO, socket, device or broken link) and were skipped"
        for entries, what in ((self.unreadable_folders, UNREADABLE_FOLDERS), (self.special_files, special)):
            if entries:
                lines.append(f"{len(entries)} {what} (first: {entries[0]})")
        return lines


@dataclass
class Matched:
    """ImageIds with both an image and labels, and those with only one of the two (each sorted)."""

    ids: list[str]
    images_without_labels: list[str]
    labels_without_images: list[str]

    def report(self) -> str:
        """One line with the counts, naming the first few images without labels and labels without images."""
        from cascade.common.messages import first_few

        unlabelled, imageless = self.images_without_labels, self.labels_without_images
        return (
            f"{len(self.ids)} images with labels, {len(unlabelled)} images without labels"
            + (f" ({first_few(unlabelled)})" if unlabelled else "")
            + f", {len(imageless)} labelled ids without images"
            + (f" ({first_few(imageless)})" if imageless else "")
        )


def image_id_of(path: str | os.PathLike[str]) -> str:
    """The ImageId of a DICOM file: its name without a ``.dcm`` suffix (any case)."""
    name = Path(path).name
    return name[: -len(SUFFIX)] if name.lower().endswith(SUFFIX) else name


def scan_dicoms(*roots: str | os.PathLike[str]) -> DicomIndex:
    """Index the DICOM files under folders (recursively) and named files; the first path in sorted order wins.

    A root that does not exist, or is not a regular file or folder (a FIFO, a symlink loop), raises CascadeError
    naming it and what it is.
    """
    found: dict[str, Path] = {}  # absolute path -> path as given, so a file reached twice counts once
    unreadable: list[Path] = []
    special: list[Path] = []
    for root in map(Path, roots):
        kind = path_kind(root)
        if kind == "file":
            files: Iterable[Path] = [root]
        elif kind == "folder":
            files = _dicom_files(root, unreadable, special)
        elif kind == "missing":
            raise CascadeError(f"{root}: no such file or folder")
        else:
            raise CascadeError(f"{root}: is {kind}, not a DICOM file or a folder")
        for path in files:
            found.setdefault(os.path.abspath(path), path)
    paths: dict[str, Path] = {}
    duplicates: dict[str, list[Path]] = {}
    for path in sorted(found.values(), key=str):
        image_id = image_id_of(path)
        if image_id in paths:
            duplicates.setdefault(image_id, []).append(path)
        else:
            paths[image_id] = path
    return DicomIndex(
        paths=dict(sorted(paths.items())), duplicates=dict(sorted(duplicates.items())),
        unreadable_folders=sorted(unreadable), special_files=sorted(special),
    )


def _dicom_files(folder: Path, unreadable: list[Path], special: list[Path]) -> Iterator[Path]:
    """Visible regular ``*.dcm`` files under ``folder`` at any depth (symlinked folders are not followed); folders
    that cannot be listed go to ``unreadable``, ``*.dcm`` entries that are not regular files to ``special``."""

    def failed(err: OSError) -> None:
        unreadable.append(Path(err.filename) if err.filename else folder)

    for dirpath, dirnames, filenames in os.walk(folder, onerror=failed):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.lower().endswith(SUFFIX) and not name.startswith("."):
                path = Path(dirpath, name)
                if path_kind(path) == "file":
                    yield path
                else:
                    special.append(path)


def match(index: DicomIndex, labels: Labels) -> Matched:
    """Pair the indexed images with the labelled ImageIds."""
    labelled = set(labels.annotations)
    return Matched(
        ids=[i for i in index.paths if i in labelled],
        images_without_labels=[i for i in index.paths if i not in labelled],
        labels_without_images=sorted(labelled.difference(index.paths)),
    )
