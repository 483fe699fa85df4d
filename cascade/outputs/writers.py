"""The outputs of batch prediction behind one interface: a :class:`Writer` is handed each
:class:`~cascade.pipeline.Prediction` once, in input order, then closed.

A prediction carries what the reader already knows about its image — the DICOM header (``Prediction.header``)
and, when a writer asks for it (``needs_image``), the decoded grey levels (``Prediction.image``) — so no writer
decodes a source again. The submission CSV is :class:`SubmissionWriter` (``--out``); the per-image files are the
:data:`OUTPUTS` registry, by name, each offered by ``cascade predict`` as ``--<name> DIR``. Heavy libraries are
imported inside ``write``, so reading the registry (``cascade predict --help``) stays light.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cascade.errors import CascadeError

if TYPE_CHECKING:
    from cascade.pipeline import Prediction


class Writer(Protocol):
    """One output of batch prediction."""

    needs_image: bool
    """True when ``write`` draws on the decoded radiograph: prediction then keeps it (``keep_image=True``)."""

    def write(self, pred: Prediction) -> bool:
        """This image's output; True when something was written for it. A ``CascadeError`` is this image's output
        failing (reported; the other images and outputs go on)."""
        ...

    def close(self) -> None:
        """After the last image (a writer of one file for all images writes it here)."""
        ...


class SubmissionWriter:
    """The challenge submission ``ImageId,EncodedPixels``: one row per predicted image, written atomically on
    :meth:`close` (:func:`cascade.data.labels.write_labels`); failed images have no row."""

    needs_image = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.rows: list[tuple[str, str]] = []

    def write(self, pred: Prediction) -> bool:
        if not pred.ok:
            return False
        self.rows.append((pred.image_id, pred.rle))
        return True

    def close(self) -> None:
        from cascade.data.labels import write_labels

        write_labels(self.path, self.rows)


class PerImageWriter:
    """``DIR/<ImageId><suffix>`` per positive image, drawn by :meth:`write_file` (a subclass sets both)."""

    needs_image = False
    suffix = ""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def write(self, pred: Prediction) -> bool:
        if not pred.positive:
            return False
        self.write_file(self.folder / f"{pred.image_id}{self.suffix}", pred)
        return True

    def write_file(self, path: Path, pred: Prediction) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class OverlayWriter(PerImageWriter):
    """``DIR/<ImageId>.png`` per positive image: :func:`cascade.outputs.overlay.overlay_png`."""

    needs_image = True
    suffix = ".png"

    def write_file(self, path: Path, pred: Prediction) -> None:
        from cascade.outputs.overlay import write_overlay

        write_overlay(path, pred)


class DicomSegWriter(PerImageWriter):
    """``DIR/<ImageId>.dcm`` per positive image: :func:`cascade.outputs.dicom_seg.write_segmentation`."""

    suffix = ".dcm"

    def write_file(self, path: Path, pred: Prediction) -> None:
        from cascade.outputs.dicom_seg import write_segmentation

        write_segmentation(pred, path)


@dataclass(frozen=True)
class Output:
    """A writer of files into a folder, as ``cascade predict --<name> DIR`` offers it."""

    name: str
    writer: Callable[[str | os.PathLike[str]], Writer]
    help: str
    summary: str = ""
    """Added to the run's summary line, ``{count}`` (images it wrote) and ``{folder}`` filled; empty: nothing."""


OUTPUTS: dict[str, Output] = {
    output.name: output
    for output in (
        Output("overlays", OverlayWriter, "also write a PNG per positive image: mask outline + probability"),
        Output(
            "dicom-seg",
            DicomSegWriter,
            "also write a DICOM SEG per positive image, DIR/<ImageId>.dcm, referencing its source (a PACS files it "
            "with the image); DIR must lie outside the inputs and the model folder",
            summary="{count} DICOM SEG written to {folder}",
        ),
    )
}
"""The per-image outputs by name (in the order ``cascade predict`` lists its options)."""


@dataclass(frozen=True)
class Written:
    """One image after its outputs: the prediction without its arrays and header (small enough to gather from
    every shard), the outputs that wrote something for it, and its outputs' failures."""

    prediction: Prediction
    wrote: tuple[str, ...] = ()
    failures: tuple[str, ...] = ()


def write_image(pred: Prediction, writers: Mapping[str, Writer]) -> Written:
    """Hand one prediction to every writer (by name); a writer's ``CascadeError`` is recorded, not raised."""
    wrote: list[str] = []
    failures: list[str] = []
    for name, writer in writers.items():
        try:
            if writer.write(pred):
                wrote.append(name)
        except CascadeError as err:
            failures.append(str(err))
    light = dataclasses.replace(pred, mask=None, header=None, image=None)
    return Written(light, tuple(wrote), tuple(failures))


def write_all(predictions: Iterable[Prediction], writers: Mapping[str, Writer]) -> list[Written]:
    """Every prediction through every writer, in order, then each writer closed."""
    written = [write_image(pred, writers) for pred in predictions]
    for writer in writers.values():
        writer.close()
    return written
