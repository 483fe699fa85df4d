"""Finding DICOM files and matching them to labels by ImageId (the file name without ``.dcm``).

Folders are scanned recursively for ``*.dcm`` in any letter case; hidden files and folders (``._x.dcm`` from
macOS, ``.git``) and files without that extension (``DICOMDIR``, notes) are skipped. A file named explicitly is
taken whatever its name: its ImageId is the name without a ``.dcm`` suffix, never cut at another dot
(SOPInstanceUIDs are dotted).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cascade.data.labels import Labels
from cascade.errors import CascadeError

SUFFIX = ".dcm"


@dataclass
class DicomIndex:
    """ImageId -> path, sorted by ImageId; ``duplicates`` holds the other paths of an ImageId found twice or more."""

    paths: dict[str, Path]
    duplicates: dict[str, list[Path]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class Matched:
    """ImageIds with both an image and labels, and those with only one of the two (each sorted)."""

    ids: list[str]
    images_without_labels: list[str]
    labels_without_images: list[str]

    def report(self) -> str:
        """One line with the counts, naming the first few images without labels and labels without images."""
        from cascade.messages import first_few

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

    A root that does not exist raises CascadeError naming it.
    """
    found: dict[str, Path] = {}  # absolute path -> path as given, so a file reached twice counts once
    for root in map(Path, roots):
        if root.is_file():
            files: Iterable[Path] = [root]
        elif root.is_dir():
            files = _dicom_files(root)
        else:
            raise CascadeError(f"{root}: no such file or folder")
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
    return DicomIndex(paths=dict(sorted(paths.items())), duplicates=dict(sorted(duplicates.items())))


def _dicom_files(folder: Path) -> Iterator[Path]:
    """Visible ``*.dcm`` files under ``folder`` at any depth (symlinked folders are not followed)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.lower().endswith(SUFFIX) and not name.startswith("."):
                yield Path(dirpath, name)


def match(index: DicomIndex, labels: Labels) -> Matched:
    """Pair the indexed images with the labelled ImageIds."""
    labelled = set(labels.annotations)
    return Matched(
        ids=[i for i in index.paths if i in labelled],
        images_without_labels=[i for i in index.paths if i not in labelled],
        labels_without_images=sorted(labelled.difference(index.paths)),
    )
