"""Sending the SEGs in ``DIR/outbox/`` to the ``--forward`` destination, with back-off, until each is stored.

One thread; each round opens one association, C-STOREs every SEG waiting (oldest first) and removes each one the
destination has stored (status Success or Warning). When the destination cannot be reached or refuses, the SEGs
stay in the outbox and the next round waits 1 s, then 2, 4, … up to ``retry_max``; what is still there when the
node stops is sent at its next start.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from cascade.errors import ConfigError
from cascade.listen.spool import Spool

log = logging.getLogger("cascade.listen")

_DESTINATION = re.compile(r"(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})")
TIMEOUT = 30.0
"""Seconds to wait for a connection, an association answer or a C-STORE response before giving the round up."""


def uid_hash(uid: str) -> str:
    """What logs say instead of a SOP Instance UID: the first 12 hex digits of its sha256."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:12]


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


class Forwarder:
    """The outbox's sender thread: ``submit`` a UID once its SEG is in the outbox and its finding is written."""

    def __init__(self, outbox: Spool, destination: Destination, calling_ae: str, retry_max: float = 60.0) -> None:
        self.outbox = outbox
        self.destination = destination
        self.calling_ae = calling_ae
        self.retry_max = retry_max
        self._waiting: set[str] = set()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cascade-forward", daemon=True)

    def start(self, waiting: Iterable[str] = ()) -> None:
        self._waiting.update(waiting)
        self._thread.start()

    def submit(self, uid: str) -> None:
        with self._changed:
            self._waiting.add(uid)
            self._changed.notify()

    def stop(self) -> None:
        """Stop after the SEG being sent (what is left stays in the outbox for the next start)."""
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
                batch = sorted(self._waiting, key=self._age)
            if self._stop.is_set():
                return
            sent, problem = self._send(batch)
            with self._changed:
                self._waiting.difference_update(sent)
                left = len(self._waiting)
            if problem is None:
                delay = 1.0
                continue
            log.warning("forward to %s: %s; %d SEG(s) kept in %s, retry in %.0f s",
                        self.destination, problem, left, self.outbox.folder, delay)
            self._stop.wait(delay)
            delay = min(2 * delay, self.retry_max)

    def _age(self, uid: str) -> float:
        try:
            return self.outbox.path(uid).stat().st_mtime
        except OSError:
            return 0.0

    def _send(self, uids: list[str]) -> tuple[set[str], str | None]:
        """C-STORE ``uids`` in one association; the UIDs done with (stored, or no longer in the outbox) and what
        went wrong, if anything."""
        from pydicom import dcmread
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE
        from pynetdicom.sop_class import SegmentationStorage
        from pynetdicom.status import code_to_category

        ae = AE(ae_title=self.calling_ae)
        ae.add_requested_context(SegmentationStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
        dest = self.destination
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            return set(), "cannot associate (destination down, unreachable, or refusing this AE title)"
        done: set[str] = set()
        problem = None
        try:
            for uid in uids:
                if self._stop.is_set():
                    break
                path = self.outbox.path(uid)
                if not path.exists():
                    done.add(uid)
                    continue
                try:
                    status = assoc.send_c_store(dcmread(path))
                except (ValueError, RuntimeError, OSError) as err:  # no SEG context accepted, file unreadable
                    problem = f"cannot send ({type(err).__name__}: the destination may not accept DICOM SEG)"
                    break
                code = status.get("Status") if status else None
                if code is None:
                    problem = "no answer to C-STORE (association lost)"
                    break
                if code_to_category(code) in ("Success", "Warning"):
                    self.outbox.remove(uid)
                    done.add(uid)
                    log.info("%s SEG stored at %s", uid_hash(uid), dest)
                else:
                    problem = f"C-STORE refused with status 0x{code:04X}"
        finally:
            if assoc.is_established:
                assoc.release()
        return done, problem
