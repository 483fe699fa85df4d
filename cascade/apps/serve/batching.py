"""Dynamic micro-batching: images of concurrent requests share one classifier forward (and one segmenter forward
for those that pass the gate) through :meth:`cascade.inference.pipeline.Cascade.predict_batch`.

A batch starts when ``max_batch`` images wait, when the oldest has waited ``window`` seconds, or at once when no
other request is still decoding (nothing more is coming soon, so a lone request pays no window). Inference runs on
one dedicated thread, so the event loop stays free and the next batch gathers while the current one computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cascade.inference.pipeline import Cascade, Prediction


@dataclass(frozen=True)
class Answer:
    """One image's prediction and what its batch cost (the forwards are shared by the batch)."""

    prediction: Prediction
    batch_size: int
    queue_s: float
    classifier_s: float
    segmenter_s: float
    """The batch's segmenter forward; 0 when this image was gated out."""


@dataclass(eq=False)
class _Job:
    item: Any
    future: asyncio.Future[Answer]
    arrived: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Queue of prepared images → batched :meth:`Cascade.predict_batch` calls on the inference thread."""

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        window_s: float,
        max_batch: int,
        on_batch: Callable[[int, float, float], None] | None = None,
    ) -> None:
        self.model: Cascade | None = None
        self._executor = executor
        self._window = window_s
        self._max_batch = max_batch
        self._on_batch = on_batch
        self._pending: deque[_Job] = deque()
        self._arriving = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, model: Cascade) -> None:
        """Serve with ``model`` (loaded and warmed up); call from the event loop."""
        self.model = model
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in self._pending:
            job.future.cancel()

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as on its way (decoding), so a batch may wait the window for it."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            self._wake.set()

    async def predict(self, item: Any) -> Answer:
        """Queue one prepared image (``Cascade.prepare``) and wait for its answer."""
        job = _Job(item, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._wake.set()
        return await job.future

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            wait = self._pending[0].arrived + self._window - time.perf_counter()
            if len(self._pending) < self._max_batch and self._arriving and wait > 0:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            count = min(self._max_batch, len(self._pending))
            jobs = [self._pending.popleft() for _ in range(count)]
            jobs = [job for job in jobs if not job.future.done()]  # a client that went away is not computed
            if jobs:
                await self._compute(jobs)

    async def _compute(self, jobs: list[_Job]) -> None:
        assert self.model is not None
        model = self.model
        started = time.perf_counter()
        try:
            before = model.stage_seconds
            preds = await asyncio.get_running_loop().run_in_executor(
                self._executor, model.predict_batch, [job.item for job in jobs]
            )
            after = model.stage_seconds
        except Exception as err:  # noqa: BLE001 - every waiting request gets the failure, the service goes on
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        cls_s = after["classifier"] - before["classifier"]
        seg_s = after["segmenter"] - before["segmenter"]
        if self._on_batch is not None:
            self._on_batch(len(jobs), cls_s, seg_s)
        for job, pred in zip(jobs, preds):
            if job.future.done():
                continue
            segmented = pred.probability >= model.thresholds.cls
            job.future.set_result(
                Answer(pred, len(jobs), started - job.arrived, cls_s, seg_s if segmented else 0.0)
            )
