"""The usage ledger: a UsageSink that writes rows to the Store off the request path.

record() appends to a list under a lock: it never touches the database and never raises. A
daemon writer thread inserts what is pending in one transaction every flush_interval_s, so a
kill -9 loses at most the rows of the last interval, and what the database holds is always a
prefix of what was recorded (rows are written in order, each batch all or nothing). A database
error is logged and the batch retried at the next flush, ahead of newer rows; past max_pending
rows the oldest are dropped (and counted), so an unreachable database cannot eat the memory.
"""

from __future__ import annotations

import logging
import threading

from ladle.metering.store import Store
from ladle.metering.usage import UsageRecord

log = logging.getLogger(__name__)
MAX_PENDING = 100_000  # rows kept for a database that keeps failing; older ones are dropped


class Ledger:
    def __init__(self, store: Store, flush_interval_s: float, max_pending: int = MAX_PENDING):
        self.store = store
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self.num_dropped = 0  # rows lost to a database that failed for too long
        self._pending: list[UsageRecord] = []
        self._lock = threading.Lock()  # guards _pending
        self._flush_lock = threading.Lock()  # one batch in flight at a time: rows stay in order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ladle-ledger", daemon=True)
        self._thread.start()

    def record(self, row: UsageRecord) -> None:
        with self._lock:
            self._pending.append(row)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def flush(self) -> bool:
        """Insert what is pending now; False (rows kept for the next try) if the database failed."""
        with self._flush_lock:
            with self._lock:
                batch, self._pending = self._pending, []
            if not batch:
                return True
            try:
                self.store.insert_usage(batch)
                return True
            except Exception as e:  # the database's error, whatever its kind: never the server's
                log.warning("ledger: writing %d usage rows failed (retrying): %s", len(batch), e)
                self._requeue(batch)
                return False

    def _requeue(self, batch: list[UsageRecord]) -> None:
        with self._lock:
            self._pending = batch + self._pending
            excess = len(self._pending) - self.max_pending
            if excess > 0:
                self.num_dropped += excess
                self._pending = self._pending[excess:]
                log.error("ledger: dropped the %d oldest usage rows (the database failed too long)", excess)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self.flush()

    def close(self) -> None:
        """Stop the writer and write what is left (one last try)."""
        self._stop.set()
        self._thread.join()
        if not self.flush():
            log.error("ledger: %d usage rows were not written at shutdown", self.num_pending)
