"""GET /admin/stats' pieces without a server: a model's gauges now, and the sampler that records them."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from ladle.engine.load import LoadSnapshot
from ladle.metering.live import LiveSeries
from ladle.metering.prometheus import ServerMetrics
from ladle.router.endpoint import EndpointStatus, Phase
from ladle.server.stats_api import current, sample_gauges


class FakeLLM:
    kind, is_loaded = "llm", True

    def __init__(self, name: str, running: int = 2, waiting: int = 3):
        self.name, self.info = name, SimpleNamespace(kv_capacity_tokens=4096)
        self._load = LoadSnapshot(num_running=running, num_waiting=waiting)

    def status(self):
        return EndpointStatus(Phase.READY, num_in_flight=5)

    def load(self):
        return self._load


class Broken(FakeLLM):
    def load(self):
        raise RuntimeError("a bug")


def test_current_reads_the_load_estimate_and_the_engine_gauges():
    metrics = ServerMetrics()
    metrics.attach_engine("m", lambda: SimpleNamespace(kv_usage=0.25), 16)
    assert current(FakeLLM("m"), metrics) == {"state": "ready", "in_flight": 5, "running": 2, "waiting": 3,
                                              "kv_usage": 0.25, "kv_cache_tokens": 4096}  # fmt: skip
    batched = SimpleNamespace(name="e", info=None, num_queued=7, status=lambda: EndpointStatus(Phase.READY),
                              load=lambda: None)  # fmt: skip
    assert current(batched, metrics) == {"state": "ready", "in_flight": 0, "running": None, "waiting": 7,
                                         "kv_usage": None, "kv_cache_tokens": None}  # a batcher's queue  # fmt: skip


def test_the_sampler_keeps_each_buckets_peaks_and_a_broken_model_stops_no_other(caplog):
    clock = [1_000_000.0]
    metrics = ServerMetrics(LiveSeries(clock=lambda: clock[0]))
    metrics.attach_engine("m", lambda: SimpleNamespace(kv_usage=0.5), 16)
    endpoints = {"broken": Broken("broken"), "m": FakeLLM("m")}
    state = SimpleNamespace(metrics=metrics, registry=SimpleNamespace(endpoints=endpoints))

    async def run():
        task = asyncio.create_task(sample_gauges(state, interval_s=0.001))
        await asyncio.sleep(0.02)
        endpoints["m"]._load = LoadSnapshot(num_running=1, num_waiting=9)
        await asyncio.sleep(0.02)
        task.cancel()

    asyncio.run(run())
    (bucket,) = metrics.live.buckets("m", 5)
    assert (bucket.running_max, bucket.waiting_max, bucket.kv_usage_max) == (2, 9, 0.5)
    assert [r.getMessage() for r in caplog.records] == ["sampling the gauges of model broken failed"]  # once
