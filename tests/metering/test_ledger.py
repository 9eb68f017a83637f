"""The ledger: record() never blocks or raises, rows reach the store within the flush interval,
in order, and a failing database costs a retry, not the rows (up to its bound)."""

from __future__ import annotations

import time

from ladle.config import MeteringConfig
from ladle.metering.ledger import Ledger
from ladle.metering.store import Store
from ladle.metering.usage import UsageRecord


def row(i: int) -> UsageRecord:
    return UsageRecord(time_s=float(i), request_id=f"r{i}", tenant="default", key_id=None, api="/v1/completions",
                       model_requested=None, model="m", prompt_tokens=i, cached_tokens=0, completion_tokens=1,
                       queue_s=None, ttft_s=None, duration_s=0.0, engine_s=0.0, finish_reason=None, status=200,
                       outcome="served")  # fmt: skip


class FlakyStore:
    """A store whose inserts fail while `failing` is set."""

    def __init__(self):
        self.failing = True
        self.rows: list[UsageRecord] = []

    def insert_usage(self, rows):
        if self.failing:
            raise OSError("database is down")
        self.rows.extend(rows)


def test_rows_reach_the_database_within_the_flush_interval(tmp_path):
    store = Store.open(MeteringConfig(data_dir=str(tmp_path)))
    ledger = Ledger(store, flush_interval_s=0.05)
    for i in range(100):
        ledger.record(row(i))
    deadline = time.monotonic() + 5
    while store.usage_report()[0:1] == [] or store.usage_report()[0]["requests"] < 100:
        assert time.monotonic() < deadline, "the writer never flushed"
        time.sleep(0.02)
    ledger.close()
    assert store.usage_report()[0]["prompt_tokens"] == sum(range(100))
    store.close()


def test_a_failing_database_keeps_the_rows_in_order_and_bounded(caplog):
    store = FlakyStore()
    ledger = Ledger(store, flush_interval_s=1.0, max_pending=5)
    for i in range(3):
        ledger.record(row(i))
    assert ledger.flush() is False and ledger.num_pending == 3
    for i in range(3, 7):
        ledger.record(row(i))
    assert ledger.flush() is False
    assert ledger.num_pending == 5 and ledger.num_dropped == 2  # the oldest two went
    assert "dropped the 2 oldest" in caplog.text
    store.failing = False
    ledger.close()  # the last flush writes what is left
    assert [r.request_id for r in store.rows] == [f"r{i}" for i in range(2, 7)]
