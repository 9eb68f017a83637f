"""Prometheus export: per-request latency histograms and token counters, and each engine's own
counters and gauges read at scrape time, every series labelled by the model it measured. One
registry per server, so two servers (or tests) in one process never share metrics. The same
observations feed the dashboard's live series (metering/live.py)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ladle.metering.live import LiveSeries
from ladle.metering.tenants import DEFAULT_TENANT
from ladle.metering.usage import UsageRecord

OTHER_TENANT = "other"  # the label of tenants not (or no longer) configured

# Buckets wide enough for a 2-core CPU (seconds per token) and a GPU (milliseconds).
TTFT_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
TOKEN_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
REQUEST_BUCKETS = (
    0.05,
    0.1,
    0.3,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
BATCH_TIME_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class EngineCollector:
    """Reads each loaded engine's EngineStats when Prometheus scrapes: one family per metric, one
    sample per model (a family may appear only once in a registry)."""

    def __init__(self):
        self.engines: dict[str, tuple[Callable[[], object], int]] = {}  # model -> (stats, block size)

    def collect(self):
        families: dict[str, object] = {}
        for model_name, (stats, block_size) in list(self.engines.items()):
            s = stats()
            if s is None:
                continue
            for kind, name, doc, value in self._samples(s, block_size):
                if name not in families:
                    family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                    families[name] = family(name, doc, labels=["model_name"])
                families[name].add_metric([model_name], value)
        yield from families.values()

    @staticmethod
    def _samples(s, block_size: int):
        for name, doc, value in (
            ("ladle_num_requests_running", "Requests computing now.", s.num_running),
            ("ladle_num_requests_waiting", "Requests queued (preempted ones included).", s.num_waiting),
            ("ladle_kv_cache_usage_perc", "Share of KV-cache blocks held by requests (0..1).", s.kv_usage),
            (
                "ladle_spec_decode_acceptance_rate",
                "Speculative guesses the model agreed with, as a share of those verified (since start).",
                s.spec_acceptance_rate,
            ),
            (
                "ladle_spec_decode_mean_accepted_length",
                "Tokens a speculating request gains per step: accepted guesses + 1 (since start; 0 before any).",
                s.spec_mean_accepted_length,
            ),
        ):
            yield "gauge", name, doc, value
        for name, doc, value in (
            ("ladle_num_preemptions", "Requests preempted (blocks freed, recomputed later).", s.num_preemptions),
            (
                "ladle_prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                s.prefix_queried_blocks * block_size,
            ),
            (
                "ladle_prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                s.prefix_hit_blocks * block_size,
            ),
            (
                "ladle_computed_tokens",
                "Tokens run through the model (prompts, recomputation, decodes).",
                s.num_computed_tokens,
            ),
            ("ladle_spec_decode_num_drafts", "Request steps that verified speculative guesses.", s.spec_num_drafts),
            (
                "ladle_spec_decode_num_draft_tokens",
                "Speculative guesses proposed and verified.",
                s.spec_num_draft_tokens,
            ),
            (
                "ladle_spec_decode_num_accepted_tokens",
                "Speculative guesses the model agreed with.",
                s.spec_num_accepted_tokens,
            ),
        ):
            yield "counter", name, doc, value


class ServerMetrics:
    def __init__(self, live: LiveSeries | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.live = live or LiveSeries()  # the last minutes, per model, for GET /admin/stats
        self._engines = EngineCollector()
        self.registry.register(self._engines)
        labels = ["model_name"]
        r = self.registry
        self.ttft = Histogram(
            "ladle_time_to_first_token_seconds",
            "Time from arrival to the first token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "ladle_time_per_output_token_seconds",
            "Mean time per output token after the first.",
            labels,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "ladle_inter_token_latency_seconds",
            "Time between two streamed deltas of a request.",
            labels,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "ladle_e2e_request_latency_seconds",
            "Time from arrival to the last token.",
            labels,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "ladle_request_queue_time_seconds",
            "Time from arrival to the first computation.",
            labels,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("ladle_prompt_tokens", "Prompt tokens of finished requests.", labels, registry=r)
        self.cached_tokens = Counter(
            "ladle_prompt_cached_tokens", "Prompt tokens served from the prefix cache.", labels, registry=r
        )
        self.generation_tokens = Counter("ladle_generation_tokens", "Tokens generated.", labels, registry=r)
        self.finished = Counter(
            "ladle_request_success", "Finished requests by finish reason.", labels + ["finished_reason"], registry=r
        )
        self.http = Counter(
            "ladle_http_requests", "HTTP responses by route and status.", labels + ["route", "status"], registry=r
        )

        self.outcomes = Counter(
            "ladle_router_requests",
            "Requests by the model asked for and what became of them: served, degraded (to a smaller model), "
            "fell_back (to an upstream), rejected (429), timed_out (in the queue), failed (model unavailable).",
            labels + ["outcome"],
            registry=r,
        )

        self.batch_size = Histogram(
            "ladle_batch_size",
            "Items per batch a dynamic batcher ran (non-generative models).",
            labels,
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_queue = Histogram(
            "ladle_batch_queue_time_seconds",
            "Time an item waited in a dynamic batcher's queue before its batch started.",
            labels,
            buckets=BATCH_TIME_BUCKETS,
            registry=r,
        )
        self.batch_compute = Histogram(
            "ladle_batch_compute_time_seconds",
            "Time a dynamic batcher's batch computed.",
            labels,
            buckets=BATCH_TIME_BUCKETS,
            registry=r,
        )

        tenant = ["tenant", "model_name"]  # tenant: TenantLabels bounds it to the configured tenants
        self.tenant_requests = Counter(
            "ladle_tenant_requests",
            'Requests by tenant, the model that answered ("" where none did) and outcome (usage.OUTCOMES).',
            tenant + ["outcome"],
            registry=r,
        )
        self.tenant_tokens = Counter(
            "ladle_tenant_tokens",
            "Tokens by tenant and model: kind prompt (all prompt tokens), cached (those of them served from the "
            "prefix cache), completion.",
            tenant + ["kind"],
            registry=r,
        )
        self.quota_rejections = Counter(
            "ladle_quota_rejections",
            "Requests refused (429) by their tenant's quota, by the limit they were over.",
            ["tenant", "limit"],
            registry=r,
        )

    def observe_batch(self, model_name: str, record) -> None:
        """One batch of a non-generative model (a ladle.engine.batcher.BatchRecord)."""
        self.batch_size.labels(model_name).observe(record.batch_size)
        self.batch_compute.labels(model_name).observe(record.compute_time_s)
        queue = self.batch_queue.labels(model_name)
        for wait_s in record.queue_times_s:
            queue.observe(wait_s)

    def attach_engine(self, model_name: str, stats: Callable[[], object], block_size: int) -> None:
        """Export this model's engine stats from now on (until detach_engine)."""
        self._engines.engines[model_name] = (stats, block_size)

    def detach_engine(self, model_name: str) -> None:
        self._engines.engines.pop(model_name, None)

    def engine_stats(self, model_name: str):
        """The EngineStats the collector would export for this model now (None where not attached)."""
        stats, _ = self._engines.engines.get(model_name, (None, 0))
        return stats() if stats is not None else None

    def observe_sample(self, m: str, metrics, num_output_tokens: int, finish_reason: str) -> None:
        """One finished sample of model m (RequestMetrics from the engine's final delta)."""
        if metrics is not None:
            ttft_s = None
            if metrics.first_scheduled_s is not None:
                self.queue.labels(m).observe(metrics.first_scheduled_s - metrics.arrival_s)
            if metrics.first_token_s is not None:
                ttft_s = metrics.first_token_s - metrics.arrival_s
                self.ttft.labels(m).observe(ttft_s)
                if num_output_tokens > 1:
                    self.tpot.labels(m).observe((metrics.finished_s - metrics.first_token_s) / (num_output_tokens - 1))
            self.e2e.labels(m).observe(metrics.finished_s - metrics.arrival_s)
            self.live.observe_latency(m, ttft_s, metrics.finished_s - metrics.arrival_s)
        self.finished.labels(m, finish_reason).inc()

    def observe_usage(self, m: str, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.cached_tokens.labels(m).inc(cached_tokens)
        self.generation_tokens.labels(m).inc(completion_tokens)
        self.live.observe_tokens(m, prompt_tokens, completion_tokens)

    def observe_http(self, model_name: str, route: str, status: int) -> None:
        """One HTTP response; model_name is the model the request reached ("" where none)."""
        self.http.labels(model_name, route, str(status)).inc()
        if model_name:
            self.live.observe_request(model_name, status)

    def observe_outcome(self, model_name: str, outcome: str) -> None:
        self.outcomes.labels(model_name, outcome).inc()

    def observe_tenant_usage(self, tenant: str, row: UsageRecord) -> None:
        """One finished request's usage row; tenant is its bounded label (TenantLabels)."""
        model = row.model or ""
        self.tenant_requests.labels(tenant, model, row.outcome).inc()
        for kind, num_tokens in (
            ("prompt", row.prompt_tokens),
            ("cached", row.cached_tokens),
            ("completion", row.completion_tokens),
        ):
            if num_tokens:
                self.tenant_tokens.labels(tenant, model, kind).inc(num_tokens)

    def observe_quota_rejection(self, tenant: str, limit: str) -> None:
        self.quota_rejections.labels(tenant, limit).inc()


class TenantLabels:
    """The tenant label of the per-tenant series: the tenant's id where it is configured (or the
    default tenant), else "other", so that the series stay as many as the tenants. Keys never
    appear in a label."""

    def __init__(self, is_configured: Callable[[str], bool]):
        self.is_configured = is_configured  # e.g. lambda t: directory.get(t) is not None

    def __call__(self, tenant_id: str) -> str:
        return tenant_id if tenant_id == DEFAULT_TENANT or self.is_configured(tenant_id) else OTHER_TENANT


class TenantMetricsSink:
    """A UsageSink counting each row in the per-tenant series."""

    def __init__(self, metrics: ServerMetrics, labels: TenantLabels):
        self.metrics = metrics
        self.labels = labels

    def record(self, row: UsageRecord) -> None:
        self.metrics.observe_tenant_usage(self.labels(row.tenant), row)

    def close(self) -> None:
        pass
