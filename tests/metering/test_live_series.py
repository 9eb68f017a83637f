"""The dashboard's live series: 5-second buckets per model in a ring, percentiles from bounded samples."""

from __future__ import annotations

import pytest

from ladle.metering.live import LiveSeries, Reservoir, percentile
from ladle.metering.prometheus import ServerMetrics


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_percentile_is_nearest_rank():
    values = sorted(float(v) for v in range(1, 101))
    assert percentile(values, 50) == 50.0 and percentile(values, 95) == 95.0
    assert percentile([3.0], 95) == 3.0 and percentile([], 50) is None


def test_buckets_count_what_finished_in_them_and_empty_ones_fill_the_window():
    clock = Clock(1_000_000.0)  # a bucket boundary (divisible by 5)
    live = LiveSeries(bucket_s=5, window_s=60, clock=clock)
    live.observe_tokens("m", prompt_tokens=40, output_tokens=100)
    live.observe_request("m", 200)
    live.observe_request("m", 500)
    live.observe_latency("m", 0.1, 1.0)
    clock.t += 10  # two buckets later, 2.5 s into the bucket
    clock.t += 2.5
    live.observe_tokens("m", 0, 10)
    buckets = live.buckets("m", 30)
    assert len(buckets) == 6 and [b.t for b in buckets] == [999_985.0 + 5 * i for i in range(6)]
    first = buckets[3]
    assert (first.t, first.tokens_per_s, first.prompt_tokens_per_s) == (1_000_000.0, 20.0, 8.0)
    assert (first.requests, first.errors, first.ttft_p50_s, first.latency_p95_s) == (2, 1, 0.1, 1.0)
    assert buckets[4].requests == 0 and buckets[4].ttft_p50_s is None  # an empty bucket
    assert buckets[5].tokens_per_s == 10 / 2.5  # the current bucket: over the part that passed
    window = live.window("m", 30)
    assert (window.requests, window.errors, window.output_tokens, window.prompt_tokens) == (2, 1, 110, 40)
    assert window.tokens_per_s == pytest.approx(110 / 27.5)


def test_the_ring_forgets_what_is_older_than_its_window():
    clock = Clock(1_000_000.0)
    live = LiveSeries(bucket_s=5, window_s=60, clock=clock)
    live.observe_tokens("m", 0, 50)
    clock.t += 65  # the slot comes round again: the old bucket is not read as new
    live.observe_tokens("m", 0, 5)
    buckets = live.buckets("m", 1e9)  # clamped to the ring
    assert len(buckets) == live.num_buckets == 13
    assert [b.t for b in buckets if b.tokens_per_s] == [1_000_065.0]  # the 50 tokens are gone
    assert live.window("m", 60).output_tokens == 5
    assert live.buckets("other", 10)[-1].requests == 0  # a model never seen: empty buckets


def test_a_reservoir_keeps_a_bounded_uniform_sample():
    import random

    r = Reservoir(64)
    rng = random.Random(1)
    for v in range(10_000):
        r.add(float(v), rng)
    assert len(r.values) == 64 and r.num_seen == 10_000
    assert 2_500 < percentile(sorted(r.values), 50) < 7_500


def test_server_metrics_feed_the_live_series():
    from ladle.engine.outputs import RequestMetrics

    metrics = ServerMetrics()
    metrics.observe_sample("m", RequestMetrics(10.0, 10.1, 10.25, 12.0, 0), 8, "length")
    metrics.observe_usage("m", 5, 0, 8)
    metrics.observe_http("m", "/v1/completions", 200)
    metrics.observe_http("", "/v1/completions", 404)  # reached no model: not in any model's series
    window = metrics.live.window("m", 60)
    assert (window.requests, window.output_tokens, window.prompt_tokens) == (1, 8, 5)
    assert window.ttft_p50_s == pytest.approx(0.25) and window.latency_p50_s == pytest.approx(2.0)
    assert metrics.live.models == ["m"]
