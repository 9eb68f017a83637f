"""kill -9 of a process writing usage rows through the ledger into SQLite: on reopening, the rows
present are a prefix of those recorded (no gap, no corruption), and every row recorded more than
a second before the kill is there."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

from ladle.config import MeteringConfig
from ladle.metering.store import Store

CHILD = """
import sys, time
from ladle.config import MeteringConfig
from ladle.metering.ledger import Ledger
from ladle.metering.store import Store
from ladle.metering.usage import UsageRecord

store = Store.open(MeteringConfig(data_dir=sys.argv[1]))
ledger = Ledger(store, flush_interval_s=0.25)
print("ready", flush=True)
i = 0
while True:
    now = time.time()
    ledger.record(UsageRecord(time_s=now, request_id=f"r{i}", tenant="t", key_id=None, api="/v1/completions",
        model_requested=None, model="m", prompt_tokens=i, cached_tokens=0, completion_tokens=1, queue_s=None,
        ttft_s=None, duration_s=0.0, engine_s=0.0, finish_reason=None, status=200, outcome="served"))
    print(i, repr(now), flush=True)
    i += 1
    time.sleep(0.004)
"""


def test_a_kill_9_loses_at_most_the_last_second_and_corrupts_nothing(tmp_path):
    data_dir = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(data_dir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    recorded: list[tuple[int, float]] = []
    assert proc.stdout.readline().strip() == "ready"

    def read():
        for line in proc.stdout:
            i, t = line.split()
            recorded.append((int(i), float(t)))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while not recorded or recorded[-1][1] - recorded[0][1] < 3.0:  # three seconds of steady writing
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    killed_s = time.time()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join(5)

    db = data_dir / "ladle.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        ids = [int(r[0][1:]) for r in conn.execute("SELECT request_id FROM usage ORDER BY id")]
    assert ids == list(range(len(ids))), "the rows present are not a prefix of those recorded"
    must_have = [i for i, t in recorded if t < killed_s - 1.0]
    assert must_have and len(ids) > must_have[-1], (
        f"rows recorded more than 1 s before the kill are missing: {len(ids)} present, "
        f"{must_have[-1] + 1} recorded before {killed_s - 1.0}"
    )
    store = Store.open(MeteringConfig(data_dir=str(data_dir)))  # reopens (and re-migrates) cleanly
    assert store.usage_report()[0]["requests"] == len(ids)
    store.close()
