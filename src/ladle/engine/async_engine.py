"""The engine for async callers (the HTTP server): a loop thread drives EngineCore, callers await
token deltas.

The engine loop runs in its own thread, so a forward pass never blocks the caller's event loop and
the event loop never delays a step. Requests and aborts travel to the loop through a queue;
deltas travel back with `call_soon_threadsafe`, one hop per step for all requests.

`launch` builds the engine (loading the model) inside that same thread: PyTorch's CPU ops run in an
OpenMP team per calling thread, and once a second thread has a team, libgomp sees more threads than
cores and stops spinning between parallel regions, so every region pays a sleep and a wake-up. On a
2-core EPYC that made a decode step 35 ms against 21 ms when the model was loaded in one thread and
run in another; one thread for all tensor work keeps one team.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ladle.engine.core import EngineCore
from ladle.engine.outputs import RequestOutput
from ladle.errors import InvalidRequestError
from ladle.sample.params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; the request cannot complete."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    cache_salt: str | None


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
    def __init__(self, engine: EngineCore):
        self.engine = engine
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards `streams` between the caller's loop and the engine thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._num_pending_adds = 0  # requests queued for the loop thread, not yet in the scheduler

    # -- lifecycle ---------------------------------------------------------------------------------

    @classmethod
    def launch(cls, build: Callable[[], EngineCore]) -> AsyncEngine:
        """Start the loop thread, build the engine in it with `build()`, and return once it is
        built (raising what `build` raised). Blocks: call it from a worker thread in async code."""
        built = threading.Event()
        box: dict = {}

        def main() -> None:
            try:
                box["engine"] = cls(build())
            except BaseException as e:  # handed to the caller, who reports it
                box["error"] = e
                return
            finally:
                built.set()
            box["engine"]._run()

        thread = threading.Thread(target=main, name="ladle-engine", daemon=True)
        thread.start()
        built.wait()
        if "error" in box:
            thread.join()
            raise box["error"]
        engine = box["engine"]
        engine._thread = thread
        return engine

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ladle-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self.commands.put(None)  # wake the loop
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- requests ----------------------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Token deltas of every sample of the request until all are finished. Leaving the loop
        early (a disconnected client, a cancelled task) aborts the request in the engine."""
        stream = self._open(request_id, prompt_token_ids, params)
        with self._lock:
            self._num_pending_adds += 1
        self.commands.put(_Add(request_id, prompt_token_ids, params, priority, cache_salt))
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
                self.commands.put(_Abort(request_id))

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
        self.commands.put(_Abort(request_id))

    async def call(self, fn: Callable[[EngineCore], object]):
        """Run fn(engine) on the loop thread between two steps and return its result: the way for
        a caller to reach the engine's state while the loop drives it."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.commands.put(_Call(fn, loop, future))
        return await future

    async def reset_prefix_cache(self) -> None:
        await self.call(EngineCore.reset_prefix_cache)

    def abort_all(self) -> None:
        with self._lock:
            ids = list(self.streams)
        for request_id in ids:
            self.commands.put(_Abort(request_id))

    @property
    def num_unfinished(self) -> int:
        with self._lock:
            return len(self.streams)

    @property
    def num_waiting(self) -> int:
        """Requests not yet computing: queued here or in the scheduler (preempted ones included)."""
        return self._num_pending_adds + self.engine.scheduler.num_waiting

    # -- the loop thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        self.engine.claim("an AsyncEngine's loop thread")
        try:
            self._loop()
        finally:
            self.engine.release()

    def _loop(self) -> None:
        while not self._stop.is_set():
            busy = self.engine.has_unfinished()
            if not self._apply_commands(block=not busy):
                continue
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug, not bad input: fail what is in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            self._dispatch(outputs)

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued adds and aborts; when idle, wait for one. False when woken to stop."""
        try:
            command = self.commands.get(timeout=0.5) if block else self.commands.get_nowait()
        except queue.Empty:
            return True
        while command is not None:
            self._apply(command)
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return True
        return False

    def _apply(self, command) -> None:
        if isinstance(command, _Abort):
            self.engine.abort(command.request_id)
            return
        if isinstance(command, _Call):
            self._apply_call(command)
            return
        with self._lock:
            live = command.request_id in self.streams
            self._num_pending_adds -= 1
        if not live:  # the caller left before the request reached the engine
            return
        try:
            self.engine.add_request(
                command.request_id, command.prompt_token_ids, command.params, command.priority, command.cache_salt
            )
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
