"""The DICOM node: a Storage SCP that acknowledges each radiograph once it is on disk, triages it with the cascade
and records the finding, a DICOM SR for every analysed image, the SEG of a positive (and its Secondary Capture when
asked), sent to a PACS by DIMSE and/or STOW-RS when asked; the studies' reading order in ``worklist.csv``; every
received instance and every result sent in ``audit.jsonl``.

Threads: pynetdicom's association threads (receive → ``incoming/`` → bounded queue), one model worker (takes what
is queued, up to ``batch_size`` at a time, through :meth:`Cascade.predict_many`), and one
:class:`~cascade.apps.listen.forward.Forwarder` per destination given.

Order of work for one image, chosen so that a kill at any point loses nothing and repeats nothing:
1. the C-STORE handler writes the dataset to ``incoming/<uid>.dcm`` (atomic, flushed) and only then answers
   Success; an image whose UID already has a finding or is waiting is answered Success and not stored again;
2. the worker writes the results — ``seg/<uid>.dcm`` (a positive), ``sr/<uid>.dcm`` (every analysed image; it
   references the SEG), ``sc/<uid>.dcm`` (a positive, with ``secondary_capture``) — each atomic and flushed, links
   them into each destination's outbox (``outbox/<kind>/``, ``outbox-stow/<kind>/``), then appends the line to
   ``findings.csv``, then deletes the incoming file, then hands the results to the forwarders;
3. at start, a line cut short is dropped, leftover incoming files are analysed first (skipped when their finding
   is already written; results rewritten and their links replaced otherwise, so nothing is sent twice) and outbox
   results whose finding is written are sent.

Hostile peers: an image whose header declares more pixels than the model's budget (:attr:`Cascade.max_pixels`,
``--max-pixels``) is refused in the C-STORE handler before it is stored (:data:`OVER_BUDGET`): a few-KB compressed
file can declare gigabytes. Associations are only accepted when addressed to this node's AE title; one peer
address holds at most ``max_per_peer`` at once (the next is refused with A-ASSOCIATE-RJ, transient, local limit
exceeded) and all peers together ``max_associations``; an association idle for ``idle_timeout`` seconds is aborted,
a connection that sends no association request within :data:`REQUEST_WAIT` seconds is closed.

Logs hold one line per image: the first 12 hex digits of the sha256 of its SOP Instance UID, the decision and the
milliseconds from receipt to finding; never a UID, a patient identifier or any other header value. pynetdicom's
own logger is held at WARNING (at DEBUG it prints whole datasets), pydicom's and highdicom's at ERROR (their
warnings and INFO lines quote header values and UIDs).
"""

from __future__ import annotations

import io
import logging
import math
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import Dataset, dcmread

from cascade.apps.listen.findings import HIGH, ROUTINE, Finding, FindingsLog, parse_utc
from cascade.apps.listen.forward import (
    KINDS,
    DimseSender,
    Destination,
    Forwarder,
    Item,
    Outbox,
    StowSender,
    uid_hash,
)
from cascade.apps.listen.spool import Spool, valid_uid
from cascade.apps.listen.worklist import Worklist
from cascade.data.dicom import check_max_pixels, check_pixel_budget, quiet
from cascade.errors import CascadeError, ConfigError, DicomError, PixelBudgetError
from cascade.storage.audit import AuditLog, instance_hash
from cascade.storage.fileio import durable_write_bytes

if TYPE_CHECKING:
    from pynetdicom.association import Association

    from cascade.inference.pipeline import Cascade, Prediction

log = logging.getLogger("cascade.listen")

IMAGE_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
"""The SOP classes the node accepts (with Verification); any other is refused at association."""

SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
OVER_BUDGET = 0xC001
"""C-STORE status of an image over the pixel budget: a failure in PS3.4 B.2.3's "Cannot understand" range
(0xC000-0xCFFF, the low byte this node's own). Not "Refused: Out of Resources" (0xA7xx), which tells the sender
to try again later, nor "Data Set does not match SOP Class" (0xA9xx): the dataset is a valid image the node will
not decode."""
BUDGET_COMMENT = "image over the node's pixel budget (--max-pixels)"
"""The Error Comment (0000,0902) sent with :data:`OVER_BUDGET`."""
QUEUE_WAIT = 30.0
"""Seconds a C-STORE waits for room in the queue before it is refused with Out of Resources (0xA700)."""
REQUEST_WAIT = 10.0
"""Seconds a new connection may take to send its association request (pynetdicom's ``acse_timeout``; also the
wait for a release): a connection that sends nothing is closed then, not held."""
LIMIT_REJECT = (0x02, 0x03, 0x02)
"""A-ASSOCIATE-RJ result, source, reason: rejected transient, by the presentation service provider, local limit
exceeded (PS3.8 9.3.4): what pynetdicom answers when ``max_associations`` are open, the peer may retry later."""
WORKLIST_EVERY = 60.0
"""Seconds between rewrites of ``worklist.csv`` while no image arrives (its waiting times and promotions)."""
REJECT_REASONS = {
    (0x01, 0x03): "its calling AE title is not in --accept-from",
    (0x01, 0x07): "it was addressed to another AE title than this node's",
    (0x03, 0x02): "too many associations at once (--max-associations)",
}


def accepted_transfer_syntaxes() -> list[str]:
    """Every transfer syntax pynetdicom knows whose pixels an installed decoder can read, uncompressed first;
    not Deflated."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import DeflatedExplicitVRLittleEndian
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    syntaxes = []
    for syntax in ALL_TRANSFER_SYNTAXES:
        if syntax == DeflatedExplicitVRLittleEndian:  # inflated whole, unbounded: the reader refuses it too
            continue
        try:
            if get_decoder(syntax).is_available:
                syntaxes.append(syntax)
        except NotImplementedError:
            continue
    return syntaxes


@dataclass(frozen=True)
class _Received:
    uid: str
    path: Path
    received: float
    study: str = ""


class Node:
    """``cascade listen`` as a library object: :meth:`start`, then :meth:`stop` (which drains the queue)."""

    def __init__(
        self,
        model: Cascade,
        out: str | Path,
        *,
        ae_title: str = "CASCADE",
        host: str = "127.0.0.1",
        port: int = 11112,
        forward: Destination | None = None,
        forward_stow: str | None = None,
        secondary_capture: bool = False,
        max_routine_wait: float | None = 60.0,
        accept_from: Sequence[str] = (),
        batch_size: int = 8,
        queue_size: int = 64,
        retry_max: float = 60.0,
        idle_timeout: float = 60.0,
        max_associations: int = 16,
        max_per_peer: int = 4,
    ) -> None:
        from cascade.inference.pipeline import check_batch_size  # imported already: the model is a Cascade

        check_batch_size(batch_size)
        if queue_size < 1 or retry_max <= 0 or idle_timeout <= 0:
            raise ConfigError("queue size must be at least 1, the retry limit and idle timeout positive")
        if not 1 <= max_per_peer <= max_associations:
            raise ConfigError("associations per peer must be at least 1 and at most the associations in all")
        check_max_pixels(model.max_pixels)
        if max_routine_wait is not None and not max_routine_wait > 0:
            raise ConfigError("the routine waiting cap must be positive minutes (or None: no cap)")
        self.model = model
        self.out = Path(out)
        self.ae_title, self.host, self.port = ae_title, host, port
        self.forward = forward
        self.forward_stow = forward_stow
        self.secondary_capture = secondary_capture
        self.max_routine_wait = max_routine_wait
        self.accept_from = list(accept_from)
        self.batch_size = batch_size
        self.retry_max = retry_max
        self.idle_timeout = idle_timeout
        self.max_associations, self.max_per_peer = max_associations, max_per_peer
        self._admitted: list[Association] = []
        self._queue: queue.Queue[_Received] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._draining = threading.Event()
        self._server = None
        self._ae = None
        self._worker: threading.Thread | None = None
        self._forwarders: list[Forwarder] = []
        self.audit: AuditLog | None = None
        self._worklist_written = 0.0

    @property
    def address(self) -> tuple[str, int]:
        """Where the node listens (the port the system chose when ``port`` was 0)."""
        if self._server is None:
            raise RuntimeError("the node is not started")
        return self._server.server_address[:2]

    @property
    def outbox_waiting(self) -> int:
        """Results not yet confirmed by their destinations (one per result and destination)."""
        return sum(f.waiting for f in self._forwarders)

    def start(self) -> None:
        """Recover what a previous run left, start the worker (and forwarders), then listen."""
        import highdicom  # noqa: F401  (imported now, not on the first positive: seconds of latency)
        from pynetdicom import evt
        from cascade.data.dicom import hold_dicom_loggers

        ae = self._application_entity()
        hold_dicom_loggers()
        self.findings = FindingsLog(self.out / "findings.csv")
        self.audit = AuditLog(self.out / "audit.jsonl")
        self.worklist = Worklist(self.out / "worklist.csv", self.max_routine_wait)
        for row in self.findings.rows.values():
            self.worklist.add(row["StudyInstanceUID"], parse_utc(row["received"]), row["positive"] == "1",
                              row["probability"] == "")
        self.incoming = Spool(self.out / "incoming")
        for kind in KINDS:
            (self.out / kind).mkdir(parents=True, exist_ok=True)
        self.seg_dir = self.out / "seg"
        leftovers = [
            _Received(uid, self.incoming.path(uid), self.incoming.path(uid).stat().st_mtime,
                      _study_of(self.incoming.path(uid)))
            for uid in self.incoming.uids()
        ]
        self._pending = {item.uid for item in leftovers}
        senders = []
        if self.forward is not None:
            senders.append((Outbox(self.out / "outbox"), DimseSender(self.forward, self.ae_title)))
        if self.forward_stow is not None:
            senders.append((Outbox(self.out / "outbox-stow"), StowSender(self.forward_stow)))
        waiting = 0
        for outbox, sender in senders:
            forwarder = Forwarder(outbox, sender, self.retry_max, self._on_answer)
            items = [item for item in outbox.items() if item[1] not in self._pending]
            waiting += len(items)
            forwarder.start(items)
            self._forwarders.append(forwarder)
        if leftovers or waiting:
            log.info("resuming: %d received image(s) to analyse first, %d result(s) to send", len(leftovers), waiting)
        self._write_worklist()
        self._worker = threading.Thread(target=self._work, args=(leftovers,), name="cascade-model", daemon=True)
        self._worker.start()
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        try:
            self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        except OSError as err:
            self.stop()
            raise ConfigError(f"cannot listen on {self.host}:{self.port} ({err.strerror or err})") from None
        self._ae = ae

    def _application_entity(self):  # noqa: ANN202 (a pynetdicom AE)
        """The AE: the image storage classes in every transfer syntax a decoder reads, Verification, the calling
        AE titles allowed, its own AE title required as the called one, the association limit and timeouts."""
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        try:
            ae = AE(ae_title=self.ae_title)
            ae.require_calling_aet = self.accept_from
        except ValueError as err:
            raise ConfigError(f"AE title: {err}") from None
        ae.require_called_aet = True
        ae.maximum_associations = self.max_associations
        ae.network_timeout = self.idle_timeout
        ae.acse_timeout = REQUEST_WAIT
        syntaxes = accepted_transfer_syntaxes()
        for sop_class in IMAGE_STORAGE:
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(Verification)
        return ae

    def stop(self) -> None:
        """Stop listening (associations in progress are aborted: what they had not been answered for is the
        sender's to send again), analyse everything acknowledged, and stop the forwarders."""
        if self._ae is not None:
            self._ae.shutdown()
        self._draining.set()
        if self._worker is not None:
            self._worker.join()
        for forwarder in self._forwarders:
            forwarder.stop()
        if self.audit is not None:
            self.audit.close()

    # the audit trail

    def _audit(self, event: str, **fields: object) -> None:
        """One record of ``audit.jsonl``; a failure to write it (a full disk) is logged, never raised: the node
        goes on (an image refused for want of disk would be lost to the sender's retries just the same)."""
        if self.audit is None:
            return
        try:
            self.audit.record(event=event, **fields)
        except (OSError, ValueError) as err:
            log.error("cannot write the audit trail (%s)", type(err).__name__)

    def _on_answer(self, item: Item, via: str, destination: str, outcome: str | None, status: int) -> None:
        """A destination's answer about one result: its audit record, with the finding it carries."""
        kind, uid = item
        row = self.findings.rows.get(uid, {})
        probability = float(row["probability"]) if row.get("probability") else None
        decision = ("positive" if row.get("positive") == "1" else "negative") if probability is not None else None
        self._audit("sent", via=via, destination=destination, result=kind, instance=instance_hash(uid),
                    outcome=outcome or "kept", status=status, decision=decision, probability=probability,
                    model={"weights_sha256": row.get("model", "")})

    # receiving (association threads)

    def _on_requested(self, event) -> None:  # noqa: ANN001 (a pynetdicom Event)
        """Refuse an association from a peer address that holds ``max_per_peer`` already (A-ASSOCIATE-RJ sent and
        the association ended, as pynetdicom does for its own limit): one sender cannot take every association."""
        assoc = event.assoc
        peer = assoc.requestor.address
        with self._lock:
            self._admitted = [a for a in self._admitted if a.is_alive() and not (a.is_released or a.is_aborted
                                                                                  or a.is_rejected)]
            held = sum(a.requestor.address == peer for a in self._admitted)
            if held < self.max_per_peer:
                self._admitted.append(assoc)
                return
        log.warning("refused an association from %s: it holds %d already (--max-associations-per-peer)", peer, held)
        self._audit("association-refused", peer=_peer(assoc), reason="too many associations from this address "
                    "(--max-associations-per-peer)")
        assoc.acse.send_reject(*LIMIT_REJECT)
        assoc.kill()

    def _on_store(self, event) -> int | Dataset:  # noqa: ANN001 (a pynetdicom Event)
        peer = _peer(event.assoc)
        uid = str(event.request.AffectedSOPInstanceUID or "")
        if not valid_uid(uid):
            log.warning("refused an image whose SOP Instance UID is not a valid UID")
            self._audit("received", via="dimse", peer=peer, instance=None, status=CANNOT_UNDERSTAND,
                        outcome="refused: SOP Instance UID not a valid UID")
            return CANNOT_UNDERSTAND
        seen = dict(via="dimse", peer=peer, instance=instance_hash(uid))
        data = event.encoded_dataset()
        over, study = _inspect(data, self.model.max_pixels)
        if over:
            log.warning("%s refused: over the pixel budget of %s pixels (--max-pixels); not stored", uid_hash(uid),
                        f"{self.model.max_pixels:,}")
            self._audit("received", **seen, status=OVER_BUDGET, outcome="refused: over the pixel budget")
            status = Dataset()
            status.Status, status.ErrorComment = OVER_BUDGET, BUDGET_COMMENT
            return status
        with self._lock:
            duplicate = uid in self.findings or uid in self._pending
            if not duplicate:
                self._pending.add(uid)
        if duplicate:
            log.info("%s received again; already analysed or waiting, not stored twice", uid_hash(uid))
            self._audit("received", **seen, status=SUCCESS, outcome="duplicate: already analysed or waiting")
            return SUCCESS
        try:
            path = self.incoming.put(uid, data)
        except Exception as err:  # disk full, permissions: the sender keeps the image and may retry
            self._forget(uid)
            log.error("%s not stored (%s): answered Out of Resources", uid_hash(uid), type(err).__name__)
            self._audit("received", **seen, status=OUT_OF_RESOURCES, outcome=f"refused: not stored "
                        f"({type(err).__name__})")
            return OUT_OF_RESOURCES
        try:
            self._queue.put(_Received(uid, path, time.time(), study), timeout=QUEUE_WAIT)
        except queue.Full:
            self.incoming.remove(uid)
            self._forget(uid)
            log.warning("%s refused: the queue stayed full for %.0f s", uid_hash(uid), QUEUE_WAIT)
            self._audit("received", **seen, status=OUT_OF_RESOURCES, outcome="refused: queue full")
            return OUT_OF_RESOURCES
        self._audit("received", **seen, status=SUCCESS, outcome="stored")
        return SUCCESS

    def _on_rejected(self, event) -> None:  # noqa: ANN001
        answer = event.assoc.acceptor.primitive
        reason = REJECT_REASONS.get((answer.result_source, answer.diagnostic), "refused")
        log.warning("refused an association from calling AE %r at %s: %s", event.assoc.requestor.ae_title,
                    event.assoc.requestor.address, reason)
        self._audit("association-refused", peer=_peer(event.assoc), reason=reason)

    def _forget(self, uid: str) -> None:
        with self._lock:
            self._pending.discard(uid)

    # analysing (the model worker)

    def _work(self, leftovers: list[_Received]) -> None:
        for start in range(0, len(leftovers), self.batch_size):
            self._process(leftovers[start : start + self.batch_size])
        while True:
            try:
                batch = [self._queue.get(timeout=0.2)]
            except queue.Empty:
                if self._draining.is_set():
                    return
                if time.monotonic() - self._worklist_written > WORKLIST_EVERY:
                    self._write_worklist()
                continue
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._process(batch)

    def _write_worklist(self) -> None:
        self._worklist_written = time.monotonic()
        try:
            self.worklist.write(time.time())
        except OSError as err:  # a view, rebuilt from findings.csv: the node goes on
            log.error("cannot write %s (%s)", self.worklist.path.name, err.strerror or type(err).__name__)

    def _process(self, batch: list[_Received]) -> None:
        todo = []
        for item in batch:
            if item.uid in self.findings:  # its line was written just before a kill: done already
                self.incoming.remove(item.uid)
                self._forget(item.uid)
            else:
                todo.append(item)
        try:
            for item, pred in zip(todo, self._predict(todo)):
                self._finish(item, pred)
        except Exception as err:  # e.g. a full disk: the images stay in incoming/ for the next start
            reason = f"{type(err).__name__}: {err.strerror}" if isinstance(err, OSError) else type(err).__name__
            log.error("cannot record results (%s); the images not recorded stay in %s for the next start",
                      reason, self.incoming.folder)
        if todo:
            self._write_worklist()

    def _predict(self, items: list[_Received]) -> list[Prediction | str]:
        """The predictions, in order; when the batch raises, each image alone (what still raises is a reason)."""
        if not items:
            return []
        try:
            return list(self.model.predict_many([i.path for i in items], batch_size=len(items), workers=0,
                                                keep_image=self.secondary_capture))
        except Exception as err:
            if len(items) == 1:
                return [f"internal error while analysing ({type(err).__name__})"]
            return [p for item in items for p in self._predict([item])]

    def _results(self, pred: Prediction, uid: str) -> tuple[dict[str, bytes], list[str]]:
        """The results of an analysed image as Part 10 bytes, by kind, and why any could not be made: the SEG of a
        positive, the SR of every image (referencing that SEG), the Secondary Capture of a positive when asked."""
        from cascade.outputs.dicom_common import to_bytes
        from cascade.outputs.dicom_seg import segmentation
        from cascade.outputs.dicom_sr import report_bytes
        from cascade.outputs.secondary_capture import secondary_capture_bytes

        results, errors, seg = {}, [], None
        if pred.positive:
            try:
                seg = segmentation(pred)
                results["seg"] = to_bytes(seg)
            except CascadeError as err:
                errors.append(_reason(str(err), pred.source, uid))
        try:
            results["sr"] = report_bytes(pred, seg)
        except CascadeError as err:
            errors.append(_reason(str(err), pred.source, uid))
        if pred.positive and self.secondary_capture:
            try:
                results["sc"] = secondary_capture_bytes(pred)
            except CascadeError as err:
                errors.append(_reason(str(err), pred.source, uid))
        return results, errors

    def _finish(self, item: _Received, pred: Prediction | str) -> None:
        """Write the results (and link them into the outboxes), then the finding, then forget the incoming file,
        then hand the results to the forwarders."""
        error = ""
        written: dict[str, str] = {}
        if isinstance(pred, str) or not pred.ok:
            error = pred if isinstance(pred, str) else _reason(str(pred.error), pred.source, item.uid)
        elif str(pred.header.get("SOPInstanceUID", "")) != item.uid:  # the results would reference another image
            error = "the dataset's SOP Instance UID differs from the one its C-STORE request announced"
        model = self.model.identity if isinstance(pred, str) or pred.model is None else pred.model
        study = item.study
        if error:
            probability, positive, rle = math.nan, False, ""
        else:
            probability, positive, rle = pred.probability, pred.positive, pred.rle
            study = study or _valid_or_empty(pred.header.get("StudyInstanceUID", ""))
            results, errors = self._results(pred, item.uid)
            error = "; ".join(errors)
            for kind, data in results.items():
                path = durable_write_bytes(self.out / kind / f"{item.uid}.dcm", data)
                written[kind] = f"{kind}/{path.name}"
            for forwarder in self._forwarders:
                for kind in KINDS:
                    if kind in written:
                        forwarder.outbox.link((kind, item.uid), self.out / written[kind])
                    else:  # a link left by an earlier analysis of this image, cut by a kill: not this one's
                        forwarder.outbox.remove((kind, item.uid))
        known = self.worklist.studies.get(study)
        study_priority = HIGH if positive or (known is not None and known.positives) else ROUTINE
        finding = Finding(item.uid, probability, positive, rle, item.received, time.time(), written.get("seg", ""),
                          error, study=study, study_priority=study_priority, sr=written.get("sr", ""),
                          sc=written.get("sc", ""), model=model.weights_sha256)
        self.findings.append(finding)
        self.incoming.remove(item.uid)
        self._forget(item.uid)
        self.worklist.add(study, item.received, positive, finding.failed)
        decision = "failed" if finding.failed else ("positive" if positive else "negative")
        self._audit("analysed", instance=instance_hash(item.uid), study=instance_hash(study or None),
                    decision=decision, probability=None if finding.failed else float(probability),
                    study_priority=study_priority, results=sorted(written),
                    model={"name": model.name, "version": model.version, "weights_sha256": model.weights_sha256})
        for forwarder in self._forwarders:
            forwarder.submit([(kind, item.uid) for kind in written])
        if finding.failed:
            decision = f"failed ({error})"
        elif error:
            decision += f", results missing ({error})"
        ms = (finding.finished - item.received) * 1000
        log.info("%s %s %.0f ms", uid_hash(item.uid), decision, ms)


def _peer(assoc) -> dict[str, object]:  # noqa: ANN001 (a pynetdicom Association)
    """Who is on the other end of an association: its calling AE title and address (no header value)."""
    requestor = assoc.requestor
    ae_title = requestor.ae_title
    if isinstance(ae_title, bytes):
        ae_title = ae_title.decode("ascii", "replace")
    return {"ae_title": str(ae_title).strip(), "address": requestor.address}


def _valid_or_empty(uid: object) -> str:
    text = str(uid or "")
    return text if valid_uid(text) else ""


def _study_of(path: Path) -> str:
    """The StudyInstanceUID of a stored image ("" when it has none or cannot be read)."""
    try:
        with quiet():
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"], force=True)
        return _valid_or_empty(ds.get("StudyInstanceUID", ""))
    except Exception:  # pydicom fails on a corrupt header in many ways
        return ""


def _inspect(data: bytes, max_pixels: int) -> tuple[bool, str]:
    """Whether the dataset would decode to more than ``max_pixels`` pixels (its header, and a compressed stream's
    own size fields: :func:`cascade.data.dicom.check_pixel_budget`; nothing is decoded), and its StudyInstanceUID
    ("" when it has none). Not over when the header cannot say (the worker then records why the image cannot be
    read)."""
    try:
        with quiet():
            ds = dcmread(io.BytesIO(data), force=True)
    except Exception:  # pydicom fails on a corrupt header in many ways
        return False, ""
    study = _valid_or_empty(ds.get("StudyInstanceUID", ""))
    try:
        check_pixel_budget(ds, "<C-STORE>", max_pixels)
    except PixelBudgetError:
        return True, study
    except DicomError:  # a header the worker will report on
        return False, study
    return False, study


def _reason(message: str, source: str, uid: str) -> str:
    """An error message without the incoming file's path (which holds the UID): the reason alone."""
    return message.removeprefix(f"{source}: ").replace(uid, uid_hash(uid))
