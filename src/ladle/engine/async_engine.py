"""The engine for async callers (the HTTP server): a ComputeLoop thread drives EngineCore,
callers await token deltas.

The loop runs in its own thread, so a forward pass never blocks the caller's event loop and the
event loop never delays a step. Requests and aborts travel to the loop through a queue; deltas
travel back with `call_soon_threadsafe`, one hop per step for all requests. Several AsyncEngines
may share one ComputeLoop (`ladle.engine.compute`: one thread for all tensor work, engines stepped
in turn); `launch` builds the engine (loading the model) on the loop's thread, and `start` gives an
engine built elsewhere a loop of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ladle.engine.compute import ComputeLoop
from ladle.engine.core import EngineCore
from ladle.engine.load import LoadSnapshot, LoadTracker
from ladle.engine.outputs import RequestOutput
from ladle.engine.request import GenerateRequest, output_budget
from ladle.errors import InvalidRequestError
from ladle.sample.params import SamplingParams

log = logging.getLogger(__name__)


RESERVATION_S = 10.0  # how long an admitted request may take to be submitted before it stops counting


class EngineDeadError(RuntimeError):
    """The engine loop failed; the request cannot complete."""


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[EngineCore], object]  # runs on the loop thread, between steps
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop, num_samples: int):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.num_samples = num_samples
        self.num_finished = 0


class AsyncEngine:
    def __init__(self, engine: EngineCore, compute: ComputeLoop | None = None):
        self.engine = engine
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards `streams` between the caller's loop and the engine thread
        self.compute = compute
        self._own_compute = False  # a loop of its own (start()), stopped with the engine
        self.error: BaseException | None = None
        self._num_pending_adds = 0  # requests queued for the loop thread, not yet in the scheduler
        self._pending_prompt_tokens = 0  # ... and their prompt tokens
        self._pending_outputs: dict[str, tuple[int, ...]] = {}  # ... and their samples' expected outputs
        self._reserved: dict[str, tuple[float, GenerateRequest]] = {}  # admitted, not submitted yet
        sc = engine.config.scheduler
        self.load_tracker = LoadTracker(sc.max_num_batched_tokens, sc.max_num_seqs)
        self.last_step_s = 0.0  # when its last step began (the ComputeLoop steps the least recent first)

    # -- lifecycle ---------------------------------------------------------------------------------

    @classmethod
    def launch(cls, build: Callable[[], EngineCore], compute: ComputeLoop | None = None) -> AsyncEngine:
        """Build the engine with `build()` on the compute loop's thread (a loop of its own when none
        is given), attach it there, and return once it runs (raising what `build` raised). Blocks:
        call it from a worker thread in async code."""
        own = compute is None
        compute = compute or ComputeLoop().start()
        try:
            engine = cls(compute.submit(build).result(), compute)
            compute.attach(engine).result()
        except BaseException:
            if own:
                compute.stop()
            raise
        engine._own_compute = own
        return engine

    def start(self) -> None:
        """Run on a ComputeLoop of its own (an engine built on the caller's thread)."""
        if self.compute is None:
            self.compute, self._own_compute = ComputeLoop().start(), True
            self.compute.attach(self).result()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        compute, self.compute = self.compute, None
        if compute is None:
            return
        if compute.is_running:
            try:
                compute.detach(self).result(timeout_s)
            except TimeoutError:
                log.warning("the compute loop did not detach the engine within %.0f s", timeout_s)
        if self._own_compute:
            compute.stop(timeout_s)

    @property
    def is_running(self) -> bool:
        return self.compute is not None and self.compute.is_running

    @property
    def _thread(self) -> threading.Thread | None:
        return self.compute.thread if self.compute is not None else None

    def _put(self, command) -> None:
        self.commands.put(command)
        if self.compute is not None:
            self.compute.wake()

    # -- requests ----------------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Token deltas of every sample of the request until all are finished. Leaving the loop
        early (a disconnected client, a cancelled task) aborts the request in the engine; one not
        started by its deadline_s (monotonic) finishes with reason "timeout"."""
        request_id = request.request_id
        stream = self._open(request_id, request.prompt_token_ids, request.params)
        with self._lock:
            if self._reserved.pop(request_id, None) is None:
                self._count_pending(request)
        self._put(request)
        done = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    stream.num_finished += 1
                    if stream.num_finished == stream.num_samples:
                        done = True
                        return
        finally:
            with self._lock:
                self.streams.pop(request_id, None)
            if not done:
                self._put(_Abort(request_id))

    def _open(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> _Stream:
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self.error}")
        self.engine.validate(prompt_token_ids, params)  # bad requests fail here, in the caller
        stream = _Stream(asyncio.get_running_loop(), params.n)
        with self._lock:
            if request_id in self.streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
            self.streams[request_id] = stream
        return stream

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError now if the engine would refuse the request."""
        self.engine.validate(prompt_token_ids, params)

    def abort(self, request_id: str) -> None:
        self._put(_Abort(request_id))

    async def compile_grammar(self, structured) -> None:
        """Compile (or find cached) a request's output constraint on the compiler's own thread, so
        the loop thread only copies the compiled matcher; raises InvalidRequestError."""
        await asyncio.wrap_future(self.engine.grammars.compile_async(structured))

    async def call(self, fn: Callable[[EngineCore], object]):
        """Run fn(engine) on the loop thread between two steps and return its result: the way for
        a caller to reach the engine's state while the loop drives it."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._put(_Call(fn, loop, future))
        return await future

    async def reset_prefix_cache(self) -> None:
        await self.call(EngineCore.reset_prefix_cache)

    def abort_all(self) -> None:
        with self._lock:
            ids = list(self.streams)
        for request_id in ids:
            self._put(_Abort(request_id))

    @property
    def num_unfinished(self) -> int:
        with self._lock:
            return len(self.streams)

    @property
    def num_waiting(self) -> int:
        """Requests not yet computing: queued here or in the scheduler (preempted ones included)."""
        return self._num_pending_adds + self.engine.scheduler.num_waiting

    def load(self) -> LoadSnapshot:
        """The load as of the last step, with the requests queued since (any thread may call it)."""
        snap = self.load_tracker.snapshot
        with self._lock:
            self._lapse_reservations()
            pending, tokens = self._num_pending_adds, self._pending_prompt_tokens
            outputs = tuple(n for samples in self._pending_outputs.values() for n in samples)
        if not pending:
            return snap
        return dataclasses.replace(
            snap, num_waiting=snap.num_waiting + pending, backlog_tokens=snap.backlog_tokens + tokens,
            waiting_outputs=snap.waiting_outputs + outputs,
        )  # fmt: skip

    def reserve(self, request: GenerateRequest) -> None:
        """Count a request the router has just admitted as queued, before its handler submits it:
        requests that arrive together are admitted one after another before any is submitted, and
        each must see the ones before it. generate() takes the reservation over; one never taken
        over (the client left first) lapses after RESERVATION_S."""
        with self._lock:
            if request.request_id not in self._reserved and request.request_id not in self.streams:
                self._reserved[request.request_id] = (time.monotonic(), request)
                self._count_pending(request)

    def _count_pending(self, request: GenerateRequest, sign: int = 1) -> None:
        """Under the lock."""
        self._num_pending_adds += sign
        self._pending_prompt_tokens += sign * len(request.prompt_token_ids)
        if sign > 0:
            self._pending_outputs[request.request_id] = self._expected_outputs(request)
        else:
            self._pending_outputs.pop(request.request_id, None)

    def _lapse_reservations(self) -> None:
        """Under the lock."""
        now = time.monotonic()
        for request_id, (since, request) in list(self._reserved.items()):
            if now - since > RESERVATION_S:
                del self._reserved[request_id]
                self._count_pending(request, -1)

    def _expected_outputs(self, request: GenerateRequest) -> tuple[int, ...]:
        """Output tokens each sample of a request not yet in the scheduler is expected to need."""
        p = request.params
        budget = output_budget(p.max_tokens, len(request.prompt_token_ids), self.engine.max_model_len)
        return (self.load_tracker.expected_left(budget, 0, p.ignore_eos),) * p.n

    # -- on the ComputeLoop's thread ---------------------------------------------------------------

    def _poll(self) -> None:
        """Apply the queued adds, aborts and calls."""
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return
            self._apply(command)

    def _has_work(self) -> bool:
        busy = self.engine.has_unfinished()
        if not busy:
            self.load_tracker.idle()
        return busy

    def _step(self) -> None:
        stats = self.engine.stats
        computed, finished = stats.num_computed_tokens, stats.num_finished
        started = self.last_step_s = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as e:  # a bug, not bad input: fail what is in flight, keep serving
            log.exception("engine step failed")
            self._fail_all(e)
            return
        stats = self.engine.stats
        self.load_tracker.observe_step(
            started, time.monotonic(), stats.num_computed_tokens - computed, stats.num_finished - finished
        )
        self._publish_load(outputs)
        self._dispatch(outputs)

    def _publish_load(self, outputs: list[RequestOutput]) -> None:
        scheduler, tracker = self.engine.scheduler, self.load_tracker
        for out in outputs:
            if out.finished and out.finish_reason == "stop":
                tracker.observe_stop(out.num_output_tokens)
        backlog = sum(r.num_prompt_tokens - r.num_computed_tokens for r in scheduler.waiting)
        backlog += sum(max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in scheduler.running)

        def left(r) -> int:
            return tracker.expected_left(r.max_output_tokens, len(r.output_token_ids), r.params.ignore_eos)

        running = tuple(sorted(left(r) for r in scheduler.running))
        waiting = tuple(left(r) for r in scheduler.waiting)
        tracker.publish(scheduler.num_running, scheduler.num_waiting, backlog, running, waiting)

    def _apply(self, command) -> None:
        if isinstance(command, _Abort):
            self.engine.abort(command.request_id)
            return
        if isinstance(command, _Call):
            self._apply_call(command)
            return
        with self._lock:
            live = command.request_id in self.streams
            self._count_pending(command, -1)
        if not live:  # the caller left before the request reached the engine
            return
        try:
            self.engine.add_request(
                command.request_id, command.prompt_token_ids, command.params, command.priority, command.cache_salt,
                deadline_s=command.deadline_s, tenant=command.tenant, weight=command.weight,
            )  # fmt: skip
        except Exception as e:
            self._dispatch_error(command.request_id, e)

    def _apply_call(self, command: _Call) -> None:
        try:
            result = command.fn(self.engine)
        except Exception as e:  # the caller gets it
            command.loop.call_soon_threadsafe(_settle, command.future, None, e)
            return
        command.loop.call_soon_threadsafe(_settle, command.future, result, None)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        if not outputs:
            return
        by_stream: dict[_Stream, list[RequestOutput]] = {}
        with self._lock:
            for out in outputs:
                stream = self.streams.get(out.request_id)
                if stream is not None:
                    by_stream.setdefault(stream, []).append(out)
        for stream, items in by_stream.items():
            stream.loop.call_soon_threadsafe(_put_all, stream.queue, items)

    def _dispatch_error(self, request_id: str, error: BaseException) -> None:
        with self._lock:
            stream = self.streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            ids = list(self.streams)
        for request_id in ids:
            try:
                self.engine.abort(request_id)
            except Exception:  # the engine's state may be broken: still tell the callers
                log.exception("abort after a failed step")
            self._dispatch_error(request_id, EngineDeadError(f"the engine step failed: {error}"))
        self.engine.pending_outputs.clear()


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _put_all(q: asyncio.Queue, items: list) -> None:
    for item in items:
        q.put_nowait(item)
