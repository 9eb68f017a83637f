"""Live series for the dashboard: per model, a ring of 5-second buckets over the last minutes.

Each bucket counts the output and prompt tokens of requests that finished in it, the HTTP
requests and the errors (status >= 400) that reached the model, keeps a bounded sample of TTFTs
and end-to-end latencies (at most MAX_SAMPLES each, reservoir-sampled past that) for their P50
and P95, and the peaks of the gauges sampled in it (requests running and waiting, KV-cache
usage). Tokens land in the bucket where their request finished. A leaf module: it knows no
server, router or engine; ServerMetrics feeds it, the server's gauge sampler too, GET
/admin/stats reads it.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

BUCKET_S = 5.0  # seconds per bucket
WINDOW_S = 15 * 60.0  # seconds of history kept per model
MAX_SAMPLES = 64  # latency samples kept per bucket and kind


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of sorted values; None for none."""
    if not sorted_values:
        return None
    rank = math.ceil(q / 100 * len(sorted_values))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


@dataclass
class Reservoir:
    """A uniform sample of at most `size` of the values seen (Algorithm R)."""

    size: int
    values: list[float] = field(default_factory=list)
    num_seen: int = 0

    def add(self, value: float, rng: random.Random) -> None:
        self.num_seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
            return
        j = rng.randrange(self.num_seen)
        if j < self.size:
            self.values[j] = value


@dataclass
class Bucket:
    index: int  # start time // bucket_s
    output_tokens: int = 0
    prompt_tokens: int = 0
    num_requests: int = 0  # HTTP responses that reached the model
    num_errors: int = 0  # ... with status >= 400
    ttft_s: Reservoir = field(default_factory=lambda: Reservoir(MAX_SAMPLES))
    latency_s: Reservoir = field(default_factory=lambda: Reservoir(MAX_SAMPLES))
    running_max: int | None = None  # peaks of the gauges sampled in the bucket (None: none sampled)
    waiting_max: int | None = None
    kv_usage_max: float | None = None


def _peak(old, new):
    return new if old is None or (new is not None and new > old) else old


@dataclass(frozen=True)
class BucketView:
    """One bucket as the API shows it."""

    t: float  # its start, Unix seconds
    tokens_per_s: float  # output tokens
    prompt_tokens_per_s: float
    requests: int
    errors: int
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    running_max: int | None  # the most requests running, waiting, and the highest KV-cache share
    waiting_max: int | None  # (0..1) the gauges showed when sampled in the bucket
    kv_usage_max: float | None


@dataclass(frozen=True)
class WindowView:
    """A model's whole window, summed (percentiles over the sampled values of all its buckets)."""

    requests: int
    errors: int
    output_tokens: int
    prompt_tokens: int
    tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None


class ModelSeries:
    """One model's ring of buckets; slot i holds the bucket whose index is i modulo the ring size."""

    def __init__(self, num_buckets: int):
        self.ring: list[Bucket | None] = [None] * num_buckets

    def bucket(self, index: int) -> Bucket:
        slot = index % len(self.ring)
        b = self.ring[slot]
        if b is None or b.index != index:
            b = self.ring[slot] = Bucket(index)
        return b

    def get(self, index: int) -> Bucket | None:
        b = self.ring[index % len(self.ring)]
        return b if b is not None and b.index == index else None


class LiveSeries:
    """Thread-safe: the event loop and the compute thread may both observe."""

    def __init__(self, bucket_s: float = BUCKET_S, window_s: float = WINDOW_S, clock: Callable[[], float] = time.time):
        if bucket_s <= 0 or window_s < bucket_s:
            raise ValueError(f"live series: need 0 < bucket_s <= window_s, got {bucket_s} and {window_s}")
        self.bucket_s = bucket_s
        self.window_s = window_s
        self.num_buckets = int(window_s // bucket_s) + 1  # the current, partial bucket too
        self.clock = clock
        self._models: dict[str, ModelSeries] = {}
        self._lock = threading.Lock()
        self._rng = random.Random(0)

    def _bucket(self, model: str) -> Bucket:
        series = self._models.get(model)
        if series is None:
            series = self._models[model] = ModelSeries(self.num_buckets)
        return series.bucket(int(self.clock() // self.bucket_s))

    # -- feeding -----------------------------------------------------------------------------------

    def observe_tokens(self, model: str, prompt_tokens: int, output_tokens: int) -> None:
        with self._lock:
            b = self._bucket(model)
            b.prompt_tokens += prompt_tokens
            b.output_tokens += output_tokens

    def observe_latency(self, model: str, ttft_s: float | None, latency_s: float | None) -> None:
        with self._lock:
            b = self._bucket(model)
            if ttft_s is not None:
                b.ttft_s.add(ttft_s, self._rng)
            if latency_s is not None:
                b.latency_s.add(latency_s, self._rng)

    def observe_request(self, model: str, status: int) -> None:
        with self._lock:
            b = self._bucket(model)
            b.num_requests += 1
            b.num_errors += status >= 400

    def observe_gauges(self, model: str, running: int | None, waiting: int | None, kv_usage: float | None) -> None:
        """One sample of a model's gauges (None: it has no such gauge); a bucket keeps the peaks."""
        with self._lock:
            b = self._bucket(model)
            b.running_max = _peak(b.running_max, running)
            b.waiting_max = _peak(b.waiting_max, waiting)
            b.kv_usage_max = _peak(b.kv_usage_max, kv_usage)

    def forget(self, model: str) -> None:
        with self._lock:
            self._models.pop(model, None)

    # -- reading -----------------------------------------------------------------------------------

    @property
    def models(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def buckets(self, model: str, window_s: float) -> list[BucketView]:
        """Every bucket of the last window_s seconds, oldest first, empty ones included (zeros,
        None percentiles), so a chart's time axis has no holes. The current bucket's rates are
        over the part of it that has passed."""
        now = self.clock()
        last = int(now // self.bucket_s)
        count = min(self.num_buckets, max(1, math.ceil(window_s / self.bucket_s)))
        out = []
        with self._lock:
            series = self._models.get(model)
            for index in range(last - count + 1, last + 1):
                b = series.get(index) if series is not None else None
                out.append(self._view(index, b, self.bucket_s if index < last else self._partial_s(now, last)))
        return out

    def _partial_s(self, now: float, last: int) -> float:
        """The part of the current bucket that has passed (at least a second, to damp its rates)."""
        return min(max(now - last * self.bucket_s, 1.0), self.bucket_s)

    def _view(self, index: int, b: Bucket | None, span_s: float) -> BucketView:
        t = index * self.bucket_s
        if b is None:
            return BucketView(t, 0.0, 0.0, 0, 0, None, None, None, None, None, None, None)
        ttft, latency = sorted(b.ttft_s.values), sorted(b.latency_s.values)
        return BucketView(
            t,
            b.output_tokens / span_s,
            b.prompt_tokens / span_s,
            b.num_requests,
            b.num_errors,
            percentile(ttft, 50),
            percentile(ttft, 95),
            percentile(latency, 50),
            percentile(latency, 95),
            b.running_max,
            b.waiting_max,
            b.kv_usage_max,
        )

    def window(self, model: str, window_s: float) -> WindowView:
        """The last window_s seconds of one model, summed."""
        now = self.clock()
        last = int(now // self.bucket_s)
        count = min(self.num_buckets, max(1, math.ceil(window_s / self.bucket_s)))
        requests = errors = output = prompt = 0
        ttft: list[float] = []
        latency: list[float] = []
        with self._lock:
            series = self._models.get(model)
            for index in range(last - count + 1, last + 1):
                b = series.get(index) if series is not None else None
                if b is None:
                    continue
                requests, errors = requests + b.num_requests, errors + b.num_errors
                output, prompt = output + b.output_tokens, prompt + b.prompt_tokens
                ttft += b.ttft_s.values
                latency += b.latency_s.values
        ttft.sort()
        latency.sort()
        span_s = (count - 1) * self.bucket_s + self._partial_s(now, last)
        return WindowView(
            requests,
            errors,
            output,
            prompt,
            output / span_s,
            percentile(ttft, 50),
            percentile(ttft, 95),
            percentile(latency, 50),
            percentile(latency, 95),
        )
