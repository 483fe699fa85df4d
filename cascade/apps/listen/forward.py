"""Sending the results in an outbox to a peer, with back-off, until the peer confirms each one.

An :class:`Outbox` is one folder per destination kind — ``DIR/outbox/`` for ``--forward`` (DIMSE C-STORE),
``DIR/outbox-stow/`` for ``--forward-stow`` (STOW-RS) — holding a subfolder per result kind (``seg/``, ``sr/``,
``sc/``) of hard links ``<source SOP Instance UID>.dcm`` to the results in ``DIR/seg/``, ``DIR/sr/``, ``DIR/sc/``.

One :class:`Forwarder` thread per destination; each round sends every result waiting (oldest first; of one image,
the SEG before the SR that references it) through its :class:`Sender` — :class:`DimseSender` (one association per
round) or :class:`StowSender` (POSTs of up to :data:`STOW_BATCH` instances). A result leaves the outbox only when
the peer confirmed it (:data:`STORED`: C-STORE status Success or Warning, or a STOW-RS answer whose
ReferencedSOPSequence names it) or refused it for a reason that sending again cannot change (:data:`DROPPED`, see
:func:`classify`; the result stays in ``DIR/seg|sr|sc/``). When the peer cannot be reached or answers otherwise,
the results stay and the next round waits 1 s, then 2, 4, … up to ``retry_max``; what is still there when the node
stops is sent at its next start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cascade.apps.listen.spool import Spool
from cascade.errors import ConfigError

log = logging.getLogger("cascade.listen")

_DESTINATION = re.compile(r"(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})")
TIMEOUT = 30.0
"""Seconds to wait for a connection, an association answer, a C-STORE response or an HTTP answer."""
KINDS = ("seg", "sr", "sc")
"""The result kinds, in the order one image's results are sent (the SR references the SEG)."""
STOW_BATCH = 16
"""Most instances in one STOW-RS request."""
STORED, DROPPED = "stored", "dropped"

Item = tuple[str, str]
"""An outbox entry: (result kind, source SOP Instance UID)."""


def uid_hash(uid: str) -> str:
    """What logs say instead of a SOP Instance UID: the first 12 hex digits of its sha256."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:12]


def classify(code: int) -> str | None:
    """What a peer's status for one instance means (a C-STORE Status, or a STOW-RS FailureReason: both PS3.4
    codes): :data:`STORED` for Success, Warning (0x0001, 0xBxxx) and "Duplicate SOP Instance" (0x0111, the peer has
    it); :data:`DROPPED` for a refusal that sending the same bytes again cannot change — 0xA9xx (Data Set does not
    match SOP Class), 0xCxxx (Cannot understand), 0x0122 (SOP Class not supported); None (kept, sent again) for
    everything else: 0xA7xx (Out of resources), 0x0110 (Processing failure), 0x0124 (Not authorized), unknown
    codes."""
    if code == 0x0000 or code == 0x0001 or 0xB000 <= code <= 0xBFFF or code == 0x0111:
        return STORED
    if 0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF or code == 0x0122:
        return DROPPED
    return None


@dataclass(frozen=True)
class Destination:
    """A DICOM peer: its AE title, host and port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AET@HOST:PORT``, e.g. ``ORTHANC@127.0.0.1:4242``."""
        match = _DESTINATION.fullmatch(text.strip())
        if not match or not 0 < int(match["port"]) < 65536 or not match["aet"].strip():
            raise ConfigError(f"destination {text!r} is not AET@HOST:PORT (AE title of 1-16 characters, port 1-65535)")
        return cls(match["aet"].strip(), match["host"], int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_stow_url(text: str) -> str:
    """A STOW-RS endpoint (``http(s)://HOST[:PORT]/…/studies``); ``ConfigError`` otherwise."""
    import httpx

    try:
        url = httpx.URL(text.strip())
    except (httpx.InvalidURL, TypeError):
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"--forward-stow {text!r} is not an http(s) URL (e.g. http://pacs:8042/dicom-web/studies)")
    return str(url)


def shown_url(url: str) -> str:
    """A URL as logs and the audit trail show it: without user name, password or query (which may hold a token)."""
    import httpx

    u = httpx.URL(url)
    port = f":{u.port}" if u.port else ""
    return f"{u.scheme}://{u.host}{port}{u.path}"


class Outbox:
    """``folder/<kind>/<uid>.dcm``: the results waiting for one destination."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.spools = {kind: Spool(self.folder / kind) for kind in KINDS}
        legacy = Spool(self.folder)  # the first version kept SEGs (named by their source's UID) at the top
        for uid in legacy.uids():
            os.replace(legacy.path(uid), self.spools["seg"].path(uid))

    def path(self, item: Item) -> Path:
        return self.spools[item[0]].path(item[1])

    def link(self, item: Item, source: Path) -> None:
        self.spools[item[0]].link(item[1], source)

    def remove(self, item: Item) -> None:
        self.spools[item[0]].remove(item[1])

    def items(self) -> list[Item]:
        return [(kind, uid) for kind, spool in self.spools.items() for uid in spool.uids()]


class Sender:
    """How a destination is reached. ``send`` returns, for each item the peer answered about, its outcome
    (:data:`STORED`, :data:`DROPPED` or None: kept) and status, plus what went wrong in the round, if anything."""

    kind = ""
    """``dimse`` or ``stow``: the audit trail's ``via``."""

    def send(self, items: list[tuple[Item, Path]], stop: threading.Event
             ) -> tuple[list[tuple[Item, str | None, int]], str | None]:
        raise NotImplementedError


class DimseSender(Sender):
    """C-STORE to an AE, in one association per round."""

    kind = "dimse"

    def __init__(self, destination: Destination, calling_ae: str) -> None:
        self.destination = destination
        self.calling_ae = calling_ae

    def __str__(self) -> str:
        return str(self.destination)

    def send(self, items: list[tuple[Item, Path]], stop: threading.Event
             ) -> tuple[list[tuple[Item, str | None, int]], str | None]:
        from pydicom import dcmread
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE
        from pynetdicom.sop_class import (
            ComprehensiveSRStorage,
            SecondaryCaptureImageStorage,
            SegmentationStorage,
        )

        ae = AE(ae_title=self.calling_ae)
        for sop_class in (SegmentationStorage, ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
        dest = self.destination
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            return [], "cannot associate (destination down, unreachable, or refusing this AE title)"
        answered: list[tuple[Item, str | None, int]] = []
        problem = None
        try:
            for item, path in items:
                if stop.is_set():
                    break
                try:
                    dataset = dcmread(path)
                except OSError as err:
                    problem = f"cannot read a result ({type(err).__name__})"
                    continue
                try:
                    status = assoc.send_c_store(dataset)
                except ValueError:  # no presentation context accepted for this SOP class
                    problem = f"the destination accepts no {item[0].upper()} (its presentation context was refused)"
                    continue
                except (RuntimeError, OSError) as err:
                    problem = f"cannot send ({type(err).__name__})"
                    break
                code = status.get("Status") if status else None
                if code is None:
                    problem = "no answer to C-STORE (association lost)"
                    break
                outcome = classify(int(code))
                answered.append((item, outcome, int(code)))
                if outcome is None:
                    problem = f"C-STORE refused with status 0x{int(code):04X}"
        finally:
            if assoc.is_established:
                assoc.release()
        return answered, problem


class StowSender(Sender):
    """STOW-RS (PS3.18 10.5): POST ``multipart/related; type="application/dicom"`` to the URL, up to
    :data:`STOW_BATCH` instances per request. An instance is stored when the answer's ReferencedSOPSequence
    (0008,1199) names it; one in the FailedSOPSequence (0008,1198) is classified by its FailureReason (0008,1197);
    any other answer (an HTTP error, a connection closed mid-transfer, a body that is not DICOM JSON) keeps the
    whole request's instances for the next round."""

    kind = "stow"

    def __init__(self, url: str, client_factory: Callable[[], object] | None = None) -> None:
        self.url = url
        self._client_factory = client_factory

    def __str__(self) -> str:
        return shown_url(self.url)

    def send(self, items: list[tuple[Item, Path]], stop: threading.Event
             ) -> tuple[list[tuple[Item, str | None, int]], str | None]:
        import httpx

        answered: list[tuple[Item, str | None, int]] = []
        problem = None
        client = self._client_factory() if self._client_factory else httpx.Client(timeout=TIMEOUT)
        try:
            for start in range(0, len(items), STOW_BATCH):
                if stop.is_set():
                    break
                chunk = items[start : start + STOW_BATCH]
                got, problem = self._post(client, chunk)
                answered += got
                if problem is not None:
                    break
        finally:
            client.close()
        return answered, problem

    def _post(self, client, chunk: list[tuple[Item, Path]]  # noqa: ANN001 (an httpx.Client)
              ) -> tuple[list[tuple[Item, str | None, int]], str | None]:
        import httpx
        from pydicom import dcmread

        boundary = uuid.uuid4().hex
        parts, uids = [], {}
        for item, path in chunk:
            try:
                data = path.read_bytes()
                uids[str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)] = item
            except (OSError, AttributeError):
                continue
            parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n")
        if not parts:
            return [], "cannot read the results to send"
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "Accept": "application/dicom+json"}
        try:
            answer = client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as err:
            return [], f"no answer to STOW-RS ({type(err).__name__}: the peer closed or did not answer)"
        if answer.status_code not in (200, 202, 409):
            return [], f"STOW-RS answered HTTP {answer.status_code}"
        try:
            response = answer.json()
        except ValueError:
            return [], f"STOW-RS answered HTTP {answer.status_code} without a DICOM JSON body"
        stored = {uid for uid in _sequence_values(response, "00081199", "00081155")}
        failed = dict(zip(_sequence_values(response, "00081198", "00081155"),
                          _sequence_values(response, "00081198", "00081197", default=0x0110)))
        answered = []
        for uid, item in uids.items():
            if uid in stored:
                answered.append((item, STORED, answer.status_code))
            elif uid in failed:
                answered.append((item, classify(int(failed[uid])), int(failed[uid])))
        kept = sum(outcome is None for _, outcome, _ in answered) + len(uids) - len(answered)
        problem = None
        if kept:
            problem = f"STOW-RS answered HTTP {answer.status_code}; {kept} instance(s) not confirmed"
        return answered, problem


def _sequence_values(response: object, sequence: str, tag: str, default: object = None) -> list:
    """The first value of ``tag`` in each item of ``sequence`` of a DICOM JSON object (``default`` where absent)."""
    if not isinstance(response, dict):
        return []
    items = (response.get(sequence) or {}).get("Value") or []
    values = []
    for item in items:
        value = ((item or {}).get(tag) or {}).get("Value") or [default]
        values.append(value[0])
    return values


class Forwarder:
    """One destination's sender thread: ``submit`` an item once its result is linked in the outbox and its finding
    written. ``on_answer(item, via, destination, outcome, status)`` is called for each item the peer answered
    about (the node writes it to the audit trail)."""

    def __init__(self, outbox: Outbox, sender: Sender, retry_max: float = 60.0,
                 on_answer: Callable[[Item, str, str, str | None, int], None] | None = None) -> None:
        self.outbox = outbox
        self.sender = sender
        self.retry_max = retry_max
        self.on_answer = on_answer
        self._waiting: set[Item] = set()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"cascade-forward-{sender.kind}", daemon=True)

    @property
    def destination(self) -> str:
        return str(self.sender)

    def start(self, waiting: Iterable[Item] = ()) -> None:
        self._waiting.update(waiting)
        self._thread.start()

    def submit(self, items: Iterable[Item]) -> None:
        with self._changed:
            self._waiting.update(items)
            self._changed.notify()

    def stop(self) -> None:
        """Stop after the result being sent (what is left stays in the outbox for the next start)."""
        self._stop.set()
        with self._changed:
            self._changed.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=3 * TIMEOUT)

    @property
    def waiting(self) -> int:
        with self._changed:
            return len(self._waiting)

    def _run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            with self._changed:
                while not self._waiting and not self._stop.is_set():
                    self._changed.wait()
                batch = sorted(self._waiting, key=self._order)
            if self._stop.is_set():
                return
            try:
                done, problem = self._send(batch)
            except Exception as err:  # never let the thread die: the outbox is sent at the next round
                done, problem = set(), f"internal error ({type(err).__name__})"
            with self._changed:
                self._waiting.difference_update(done)
                left = len(self._waiting)
            if problem is None:
                delay = 1.0
                continue
            log.warning("forward to %s: %s; %d result(s) kept in %s, retry in %.0f s",
                        self.destination, problem, left, self.outbox.folder, delay)
            self._stop.wait(delay)
            delay = min(2 * delay, self.retry_max)

    def _order(self, item: Item) -> tuple[float, int]:
        try:
            age = self.outbox.path(item).stat().st_mtime
        except OSError:
            age = 0.0
        return age, KINDS.index(item[0])

    def _send(self, items: list[Item]) -> tuple[set[Item], str | None]:
        """Send ``items``; those done with (confirmed, dropped, or no longer in the outbox) and the round's problem."""
        done: set[Item] = set()
        present = []
        for item in items:
            path = self.outbox.path(item)
            if path.exists():
                present.append((item, path))
            else:
                done.add(item)
        if not present:
            return done, None
        answered, problem = self.sender.send(present, self._stop)
        for item, outcome, status in answered:
            if outcome is not None:
                self.outbox.remove(item)
                done.add(item)
            kind, uid = item
            if outcome == STORED:
                log.info("%s %s stored at %s", uid_hash(uid), kind.upper(), self.destination)
            elif outcome == DROPPED:
                log.warning("%s %s refused by %s with status 0x%04X (not retried; it stays in %s/)", uid_hash(uid),
                            kind.upper(), self.destination, status, kind)
            if self.on_answer is not None:
                self.on_answer(item, self.sender.kind, self.destination, outcome, status)
        return done, problem
