"""The outputs of batch prediction behind one interface: a :class:`Writer` is handed each
:class:`~cascade.inference.pipeline.Prediction` once, in input order, then closed.

A prediction carries what the reader already knows about its image — the DICOM header (``Prediction.header``)
and, when a writer asks for it (``needs_image``), the decoded grey levels (``Prediction.image``) — so no writer
decodes a source again. The submission CSV is :class:`SubmissionWriter` (``--out``); the per-image files are the
:data:`OUTPUTS` registry, by name, each offered by ``cascade predict`` as ``--<name> DIR``. Heavy libraries are
imported inside ``write``, so reading the registry (``cascade predict --help``) stays light.

Writers of one run that refer to each other's files are linked before the first image (:func:`link_writers`): the
DICOM SR of an image references the DICOM SEG written for it in the same run (docs/dicom-results.md).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cascade.errors import CascadeError

if TYPE_CHECKING:
    from cascade.inference.pipeline import Prediction


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

    # A writer may also define ``link(writers)``: called once with all the run's writers, in the order they are
    # handed each image, before the first (:func:`link_writers`).


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
    """``DIR/<ImageId><suffix>`` per positive image — or per analysed image, positive or negative, when
    ``positives_only`` is False — drawn by :meth:`write_file` (a subclass sets ``suffix`` and it). A failed image
    never gets one."""

    needs_image = False
    suffix = ""
    positives_only = True

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def write(self, pred: Prediction) -> bool:
        if not pred.ok or (self.positives_only and not pred.positive):
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
    """``DIR/<ImageId>.dcm`` per positive image: :func:`cascade.outputs.dicom_seg.segmentation`. The SEG last
    written stays at hand (:meth:`written_for`) for the SR of the same image."""

    suffix = ".dcm"

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        super().__init__(folder)
        self._last: tuple[Prediction, Any] | None = None

    def write_file(self, path: Path, pred: Prediction) -> None:
        from cascade.outputs.dicom_common import save
        from cascade.outputs.dicom_seg import segmentation

        self._last = None
        dataset = segmentation(pred)
        save(dataset, path)
        self._last = (pred, dataset)

    def written_for(self, pred: Prediction) -> Any:
        """The SEG dataset written for ``pred`` (this very prediction, just now), else None."""
        return self._last[1] if self._last is not None and self._last[0] is pred else None


class DicomSrWriter(PerImageWriter):
    """``DIR/<ImageId>.sr.dcm`` per analysed image, positive or negative: :func:`cascade.outputs.dicom_sr.report`,
    referencing the SEG a :class:`DicomSegWriter` of the same run wrote for the image (none when it wrote none)."""

    suffix = ".sr.dcm"
    positives_only = False

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        super().__init__(folder)
        self.segmentations: DicomSegWriter | None = None

    def link(self, writers: Mapping[str, Writer]) -> None:
        order = list(writers.values())
        segs = [w for w in order if isinstance(w, DicomSegWriter)]
        if len(segs) > 1 or (segs and order.index(segs[0]) > order.index(self)):
            raise ValueError("an SR writer takes at most one SEG writer, handed each image before it")
        self.segmentations = segs[0] if segs else None

    def write_file(self, path: Path, pred: Prediction) -> None:
        from cascade.outputs.dicom_common import save
        from cascade.outputs.dicom_sr import report

        seg = self.segmentations.written_for(pred) if self.segmentations is not None else None
        save(report(pred, seg), path)


class SecondaryCaptureWriter(PerImageWriter):
    """``DIR/<ImageId>.sc.dcm`` per positive image: :func:`cascade.outputs.secondary_capture.secondary_capture`."""

    needs_image = True
    suffix = ".sc.dcm"

    def write_file(self, path: Path, pred: Prediction) -> None:
        from cascade.outputs.secondary_capture import write_secondary_capture

        write_secondary_capture(pred, path)


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
        Output(
            "dicom-sr",
            DicomSrWriter,
            "also write a DICOM SR (Comprehensive, TID 1500) per analysed image, positive or negative, "
            "DIR/<ImageId>.sr.dcm: pneumothorax present/absent, probability, area, model version and digest; it "
            "references its source and the SEG written in the same run (--dicom-seg); DIR must lie outside the "
            "inputs and the model folder",
            summary="{count} DICOM SR written to {folder}",
        ),
        Output(
            "secondary-capture",
            SecondaryCaptureWriter,
            "also write a DICOM Secondary Capture per positive image, DIR/<ImageId>.sc.dcm: the radiograph with the "
            "outline and an 'AI RESULT ... NOT FOR DIAGNOSIS' banner burned in, for viewers without DICOM SEG "
            "support; DIR must lie outside the inputs and the model folder",
            summary="{count} Secondary Capture written to {folder}",
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


def link_writers(writers: Mapping[str, Writer]) -> None:
    """Let each writer that refers to another's files (``link``) see the run's writers, once, before any image."""
    for writer in writers.values():
        link = getattr(writer, "link", None)
        if link is not None:
            link(writers)


def write_all(predictions: Iterable[Prediction], writers: Mapping[str, Writer]) -> list[Written]:
    """The writers linked (:func:`link_writers`), every prediction through every writer, in order, then each
    writer closed."""
    link_writers(writers)
    written = [write_image(pred, writers) for pred in predictions]
    for writer in writers.values():
        writer.close()
    return written
