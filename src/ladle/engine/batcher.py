"""Dynamic batching for every non-generative model (embeddings, ONNX), as Triton's dynamic batcher.

A request's item waits in one bounded queue. A batch forms around the oldest item: it waits up to
`max_queue_delay_ms` (from that item's arrival) for more, stops early once `max_batch_size` (or the
largest preferred size) is queued, then takes the items whose `size` (their padded length) is
nearest the oldest one's, so a batch pads little; with preferred sizes it is cut to the largest one
reached. `run_batch(payloads) -> results` runs through the executor given at construction (the
shared ComputeLoop for torch models, a thread pool for ONNX); up to `instances` batches run at once.
A slot holding an exception fails only that item. Plain asyncio, no tensors.

Refusals: a full queue raises QueueFull (the OpenAI routes answer 429 with Retry-After, as Ladle's
LLM admission and OpenAI's own rate limits do, which its clients retry; the KServe routes may answer
503 as Triton does); an item still queued past its timeout raises BatchQueueTimeout (503, as an LLM
request's queue timeout). An item whose caller is cancelled (its client disconnected) leaves the
queue; if its batch is already running, its result is dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ladle.config import BatchingConfig
from ladle.errors import LadleError

log = logging.getLogger(__name__)

Executor = Callable[[Callable[[], object]], Awaitable[object]]  # runs fn() somewhere, awaitable here


class QueueFull(LadleError):
    """The model's batching queue holds max_queue_size items: retry after a short while."""

    def __init__(self, name: str, max_queue_size: int, retry_after_s: int = 1):
        self.name, self.max_queue_size, self.retry_after_s = name, max_queue_size, retry_after_s
        super().__init__(
            f"the model `{name}` has {max_queue_size} requests queued (its batching.max_queue_size): "
            "retry after the delay given in Retry-After"
        )


class BatchQueueTimeout(LadleError):
    """The item waited in the queue longer than its timeout without joining a batch."""

    def __init__(self, name: str, timeout_s: float):
        self.name, self.timeout_s = name, timeout_s
        super().__init__(
            f"the request waited {timeout_s:g} s in the queue of model `{name}` without being run "
            "(its queue timeout): the server is overloaded; retry later"
        )


@dataclass(frozen=True)
class BatchRecord:
    """What one batch measured, for the metrics."""

    batch_size: int  # items run together
    max_size: int  # the largest item size (the padded length of the batch)
    queue_times_s: tuple[float, ...]  # per item: arrival to the batch's start
    compute_time_s: float  # run_batch's own time on the executor


@dataclass(eq=False)
class _Item:
    payload: object  # what run_batch gets for this item
    size: int  # its padded length: batches group items of similar size
    arrival_s: float  # monotonic
    future: asyncio.Future = field(repr=False)
    timer: asyncio.TimerHandle | None = None  # its queue timeout


def compute_loop_executor(compute) -> Executor:
    """Batches on the shared compute thread (ladle.engine.compute.ComputeLoop), between LLM steps,
    shared with the LLMs by time."""
    return lambda fn: asyncio.wrap_future(compute.submit(fn, timed=True))


def thread_pool_executor(pool: concurrent.futures.Executor) -> Executor:
    """Batches on a thread pool (size it to `instances` so that many run at once)."""
    return lambda fn: asyncio.get_running_loop().run_in_executor(pool, fn)


class DynamicBatcher:
    def __init__(
        self,
        name: str,
        run_batch: Callable[[list], list],
        config: BatchingConfig,
        executor: Executor,
        on_batch: Callable[[BatchRecord], None] | None = None,
    ):
        self.name = name
        self.run_batch = run_batch
        self.config = config
        self.executor = executor
        self.on_batch = on_batch or (lambda record: None)
        self._queue: list[_Item] = []  # in arrival order
        self._arrived = asyncio.Event()  # set when an item is queued
        self._slots = asyncio.Semaphore(config.instances)  # batches running at most
        self._running: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self.num_batches = 0

    # -- the caller's side -------------------------------------------------------------------------

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    async def submit(self, payload, size: int, timeout_s: float | None = None):
        """The result of run_batch for this payload (or its exception, raised here)."""
        if self._task is None:
            self._task = asyncio.create_task(self._form_batches(), name=f"batcher-{self.name}")
        if len(self._queue) >= self.config.max_queue_size:
            raise QueueFull(self.name, self.config.max_queue_size)
        loop = asyncio.get_running_loop()
        item = _Item(payload, size, time.monotonic(), loop.create_future())
        timeout_s = timeout_s if timeout_s is not None else self.config.queue_timeout_s
        if timeout_s is not None:
            item.timer = loop.call_later(timeout_s, self._expire, item, timeout_s)
        self._queue.append(item)
        self._arrived.set()
        try:
            return await item.future
        finally:  # cancelled (a client gone) or done: out of the queue either way
            self._forget(item)

    def _expire(self, item: _Item, timeout_s: float) -> None:
        if item in self._queue and not item.future.done():
            self._forget(item)
            item.future.set_exception(BatchQueueTimeout(self.name, timeout_s))

    def _forget(self, item: _Item) -> None:
        if item.timer is not None:
            item.timer.cancel()
        with contextlib.suppress(ValueError):
            self._queue.remove(item)

    # -- forming batches ---------------------------------------------------------------------------

    async def _form_batches(self) -> None:
        while True:
            await self._slots.acquire()  # while every instance runs, items gather into bigger batches
            try:
                await self._wait_for_batch()
                batch = self._take()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _wait_for_batch(self) -> None:
        """Until an item is queued, then until its delay passes or a full batch is queued."""
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        enough = max(self.config.preferred_batch_sizes, default=self.config.max_batch_size)
        deadline = self._queue[0].arrival_s + self.config.max_queue_delay_ms / 1e3
        while self._queue and len(self._queue) < enough:
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left_s)

    def _take(self) -> list[_Item]:
        """The oldest item and those of the nearest sizes, up to max_batch_size, cut to the largest
        preferred size reached; they leave the queue."""
        if not self._queue:
            return []
        oldest = self._queue[0]
        ranked = sorted(self._queue, key=lambda it: (abs(it.size - oldest.size), it.arrival_s))
        count = min(len(ranked), self.config.max_batch_size)
        preferred = [p for p in self.config.preferred_batch_sizes if p <= count]
        if preferred:
            count = max(preferred)
        batch = sorted(ranked[:count], key=lambda it: it.arrival_s)
        for item in batch:
            self._forget(item)
        return batch

    async def _run(self, batch: list[_Item]) -> None:
        started_s = time.monotonic()
        payloads = [it.payload for it in batch]

        def job():
            t0 = time.perf_counter()
            results = self.run_batch(payloads)
            return results, time.perf_counter() - t0

        try:
            results, compute_s = await self.executor(job)
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as e:  # the whole batch failed: every item gets the error
            log.exception("model %s: a batch of %d failed", self.name, len(batch))
            results, compute_s = [e] * len(batch), time.monotonic() - started_s
        finally:
            self._slots.release()
        self.num_batches += 1
        for item, result in zip(batch, results, strict=True):
            if item.future.done():  # its caller went away
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
        queue_times = tuple(started_s - it.arrival_s for it in batch)
        self.on_batch(BatchRecord(len(batch), max(it.size for it in batch), queue_times, compute_s))

    async def close(self) -> None:
        """Stop forming batches; queued items fail, running batches finish."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for item in list(self._queue):
            self._forget(item)
            if not item.future.done():
                item.future.set_exception(LadleError(f"the model `{self.name}` was unloaded"))
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
