"""One thread for the tensor work of every engine in the process: the ComputeLoop.

PyTorch's CPU ops run in an OpenMP team per calling thread, and once a second thread has a team,
libgomp sees more threads than cores and stops spinning between parallel regions, so every region
pays a sleep and a wake-up: on a 2-core EPYC a decode step took 35 ms against 21 ms when the model
was loaded in one thread and run in another. Two engines stepping in two threads would also split
the cores between two teams. So one thread builds every engine (loading runs there too), applies
every engine's commands and steps the engines in turn, the least recently stepped first; the step
times an engine measures then include the others' steps, which is what its admission must see.

A job that takes long (building an engine: seconds) calls `share()` between pieces of its work,
and the engines already serving step there: their streams keep going while another model loads,
and the load takes that much longer.

A batch of a non-generative model (an embedding batch: `submit(fn, timed=True)`) is shared by
time, not by turns: after one ran for d seconds, the engines with work step for about d seconds
before the next batch runs. By turns, a 68 ms embedding batch beside a 25 ms decode step took 82%
of the thread and the LLM's streams ran at 15% of their speed alone; with no engine busy, batches
run back to back.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # how long an idle loop sleeps before looking again (a command wakes it at once)
SHARE_INTERVAL_S = 0.05  # a long job gets this long between the engines' steps it lets run


class ComputeLoop:
    def __init__(self, name: str = "ladle-compute"):
        self.name = name
        self._engines: list = []  # AsyncEngines attached; touched on the loop thread only
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # (fn, future) run on the loop thread
        self._timed: queue.SimpleQueue = queue.SimpleQueue()  # (fn, future) batches shared by time
        self._owed_s = 0.0  # step time the busy engines are owed for the batches run; loop thread only
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_share_s = 0.0

    def start(self) -> ComputeLoop:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, fn: Callable[[], object], timed: bool = False) -> concurrent.futures.Future:
        """Run fn() on the loop thread between two steps (building an engine, for one). timed: a
        batch of a non-generative model, shared with the engines by time (see the module's doc)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        (self._timed if timed else self._jobs).put((fn, future))
        self._wake.set()
        return future

    def attach(self, engine) -> concurrent.futures.Future:
        return self.submit(lambda: self._attach(engine))

    def detach(self, engine) -> concurrent.futures.Future:
        return self.submit(lambda: self._detach(engine))

    def wake(self) -> None:
        self._wake.set()

    def share(self, min_interval_s: float = SHARE_INTERVAL_S) -> int:
        """From inside a job: step every engine that has work once, unless the job last shared less
        than min_interval_s ago; returns how many stepped. Anywhere else (a build on the caller's
        thread, offline) it does nothing."""
        if threading.current_thread() is not self._thread:
            return 0
        if time.monotonic() - self._last_share_s < min_interval_s:
            return 0
        for engine in self._engines:
            engine._poll()
        busy = sorted((e for e in self._engines if e._has_work()), key=lambda e: e.last_step_s)
        for engine in busy:
            engine._step()
        self._last_share_s = time.monotonic()  # the job's own time starts after the steps
        return len(busy)

    # -- the loop thread ---------------------------------------------------------------------------

    def _attach(self, engine) -> None:
        engine.engine.claim("an AsyncEngine's loop thread (a ComputeLoop)")
        self._engines.append(engine)

    def _detach(self, engine) -> None:
        if engine in self._engines:
            self._engines.remove(engine)
            engine.engine.release()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.clear()  # before looking: a command sent from now on wakes the wait below
                self._run_jobs()
                for engine in self._engines:
                    engine._poll()
                busy = [e for e in self._engines if e._has_work()]
                if not self._timed.empty() and (not busy or self._owed_s <= 0):
                    took_s = self._run_one(self._timed)
                    self._owed_s = took_s if busy else 0.0
                    continue
                if not busy:
                    self._wake.wait(IDLE_WAIT_S)
                    continue
                started = time.monotonic()
                min(busy, key=lambda e: e.last_step_s)._step()
                self._owed_s = max(0.0, self._owed_s - (time.monotonic() - started))
        finally:
            for engine in list(self._engines):
                self._detach(engine)

    def _run_jobs(self) -> None:
        while not self._jobs.empty():
            self._run_one(self._jobs)

    def _run_one(self, jobs: queue.SimpleQueue) -> float:
        """Run the next job of `jobs`; the seconds it took."""
        try:
            fn, future = jobs.get_nowait()
        except queue.Empty:
            return 0.0
        if not future.set_running_or_notify_cancel():
            return 0.0
        started = self._last_share_s = time.monotonic()
        try:
            future.set_result(fn())
        except BaseException as e:  # the submitter gets it
            future.set_exception(e)
        return time.monotonic() - started
