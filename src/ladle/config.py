"""One frozen config tree, built once at the edge (CLI, LLM(...)) and passed down; each component
takes only its part. Validation happens here, so a bad flag fails at startup with its name."""

from __future__ import annotations

from dataclasses import dataclass, field

from ladle.errors import LadleError

INLINE = {"inline": True}  # a config file gives this field's own fields in the parent's mapping

POLICIES = ("fcfs", "priority", "vtc")  # ladle.engine.policy implements them
PRIORITY_CLASSES = ("interactive", "batch")  # a tenant's class: interactive requests go first
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")  # what redis-py's from_url reads
BUDGET_PERIODS = ("day", "month")  # a tenant's token or cost budget renews every period (UTC)
QUANTIZATION_METHODS = ("none", "int8", "int4", "from-gguf", "w8a8")  # ladle.model.quant implements them
TOOL_CALL_PARSERS = ("auto", "hermes", "llama3_json")  # ladle.server.tool_parsers implements them
MODEL_KINDS = ("llm", "embedding", "onnx")  # what a model entry serves: ladle.router.registry builds each
RUNTIMES = ("torch", "onnxruntime")  # what runs an embedding model: Ladle's torch encoder, or it exported to ONNX


def check_quantization(method: str) -> str:
    if method not in QUANTIZATION_METHODS:
        raise LadleError(f"unknown quantization {method!r} (choose {', '.join(QUANTIZATION_METHODS)})")
    return method


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None  # GGUF file or HF folder; None = the embedded default
    served_name: str | None = None  # name in the API (default: from the file or folder)
    dtype: str = "auto"  # float32, bfloat16, float16 or auto
    device: str = "auto"  # cpu, cuda, cuda:N or auto
    max_model_len: int | None = None  # cap on prompt + output tokens (default: the model's context)
    attention_backend: str = "auto"  # "cpu" (C++ paged kernel), "sdpa", or auto
    quantization: str = "none"  # weight-only quantization of the decoder layers: QUANTIZATION_METHODS
    runtime: str = "torch"  # RUNTIMES: embedding models may run exported to ONNX Runtime; LLMs run on torch
    # what a load measures (w8a8's calibration, packed linears' row plans) is kept here; None: never
    calibration_cache: str | None = "~/.cache/ladle/calibration"

    def __post_init__(self):
        check_quantization(self.quantization)
        if self.runtime not in RUNTIMES:
            raise LadleError(f"unknown runtime {self.runtime!r} (choose {', '.join(RUNTIMES)})")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    kv_cache_memory_gib: float | None = None  # KV budget; None = a share of free memory
    enable_prefix_caching: bool = True  # reuse computed blocks of shared prefixes

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise LadleError(f"--block-size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory_gib is not None and self.kv_cache_memory_gib <= 0:
            raise LadleError(f"--kv-cache-memory must be positive, got {self.kv_cache_memory_gib}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # tokens computed per step, all requests together
    max_num_seqs: int = 64  # requests running at once
    policy: str = "vtc"  # POLICIES: "fcfs", "priority" (lower value first, preempting) or "vtc" (fair by tenant)
    enable_chunked_prefill: bool = True  # a prompt longer than the budget computes over several steps

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise LadleError(f"unknown scheduling policy {self.policy!r} (choose {' or '.join(POLICIES)})")
        if self.max_num_batched_tokens < 1:
            raise LadleError(f"--max-num-batched-tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise LadleError(f"--max-num-seqs must be at least 1, got {self.max_num_seqs}")


SPECULATIVE_METHODS = ("none", "ngram", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: a proposer guesses the next tokens of a decoding request, the model
    checks them all in one forward pass and keeps the longest run it agrees with."""

    method: str = "none"  # "ngram" (prompt lookup), "draft" (a smaller model) or "none"
    num_speculative_tokens: int = 5  # K: tokens proposed per request and step (5: the measured setting)
    draft_model: str | None = None  # GGUF file or HF folder of the draft model (method "draft")
    ngram_min: int = 1  # shortest suffix n-gram looked up in the request's tokens
    ngram_max: int = 4  # longest, tried first
    # speculation pauses while more requests than this run (0 = never pauses). The default is the
    # crossover measured on a 2-core CPU, editing workload, K=5: TPOT 1.8x better at 1 request,
    # 1.6x at 2, 1.15x at 4, 0.75x at 8 (benchmarks/results/serve-{plain,ngram}-c*-editing-*.json)
    disable_batch_size: int = 4

    def __post_init__(self):
        if self.method not in SPECULATIVE_METHODS:
            raise LadleError(f"unknown speculative method {self.method!r} (choose {', '.join(SPECULATIVE_METHODS)})")
        if self.method == "none":
            return
        if self.num_speculative_tokens < 1:
            raise LadleError(f"--num-speculative-tokens must be at least 1, got {self.num_speculative_tokens}")
        if self.method == "draft" and not self.draft_model:
            raise LadleError("--speculative draft needs --draft-model PATH (a smaller model with the same tokenizer)")
        if self.method != "draft" and self.draft_model:
            raise LadleError("--draft-model is only used with --speculative draft")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise LadleError(f"need 1 <= --ngram-min <= --ngram-max, got {self.ngram_min} and {self.ngram_max}")
        if self.disable_batch_size < 0:
            raise LadleError(f"--speculative-disable-batch-size must be >= 0, got {self.disable_batch_size}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig, metadata=INLINE)
    cache: CacheConfig = field(default_factory=CacheConfig, metadata=INLINE)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig, metadata=INLINE)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    seed: int = 0  # seeds the sampling of requests that bring no seed of their own


@dataclass(frozen=True)
class LatencyTargets:
    """What admission keeps a model's served requests to (P95 goals); None: no target."""

    ttft_ms: float | None = None  # time to first token
    tpot_ms: float | None = None  # time per output token after the first

    def __post_init__(self):
        for name in ("ttft_ms", "tpot_ms"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise LadleError(f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching of a non-generative model (embedding, ONNX), as Triton's dynamic batcher:
    a batch forms from the requests that arrive within max_queue_delay_ms of the first one."""

    max_batch_size: int = 32  # items run together at most
    max_queue_delay_ms: float = 2.0  # how long the first item of a batch waits for others
    preferred_batch_sizes: tuple[int, ...] = ()  # sizes a batch is cut to when it reaches one (largest first)
    max_queue_size: int = 1024  # items waiting beyond this are refused (429)
    queue_timeout_s: float | None = None  # an item still queued this long fails with a timeout; None: never
    instances: int = 1  # batches run at once (copies of the model, where the executor allows)

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise LadleError(f"batching.max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_queue_delay_ms < 0:
            raise LadleError(f"batching.max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                raise LadleError(
                    f"batching.preferred_batch_sizes: {size} is not in 1..max_batch_size ({self.max_batch_size})"
                )
        if self.max_queue_size < 1:
            raise LadleError(f"batching.max_queue_size must be at least 1, got {self.max_queue_size}")
        if self.queue_timeout_s is not None and self.queue_timeout_s <= 0:
            raise LadleError(f"batching.queue_timeout_s must be positive, got {self.queue_timeout_s}")
        if self.instances < 1:
            raise LadleError(f"batching.instances must be at least 1, got {self.instances}")


@dataclass(frozen=True)
class ModelEntry:
    """One model the server serves: its engine and how the router treats it."""

    name: str  # the name requests address it by
    kind: str = "llm"  # MODEL_KINDS: an LLM (generate), an embedding model (embed), an ONNX model (infer)
    engine: EngineConfig = field(default_factory=EngineConfig, metadata=INLINE)
    aliases: tuple[str, ...] = ()  # other names that reach it
    targets: LatencyTargets = field(default_factory=LatencyTargets)
    degrade_to: str | None = None  # the model a request goes to when this one would break its target
    fallback: str | None = None  # the upstream used when this model is short of capacity or failing
    warmup_prompts: tuple[str, ...] = ()  # prompts run before it turns ready (default: two synthetic ones)
    idle_unload_s: float | None = None  # unloaded after this long without a request; None: never
    pinned: bool = False  # never evicted by the memory budget, never idle-unloaded
    load_at_start: bool = True  # loaded when the server starts (else on the first request)
    max_waiting_requests: int = 256  # requests queued for it beyond this get 429
    max_waiting_prompt_tokens: int = 1 << 20  # prompt tokens queued for it beyond this get 429
    tool_call_parser: str = "auto"  # how its output's tool calls read: TOOL_CALL_PARSERS (auto: from the template)
    batching: BatchingConfig = field(default_factory=BatchingConfig)  # non-generative kinds only

    def __post_init__(self):
        if not self.name:
            raise LadleError("a model needs a name")
        if self.kind not in MODEL_KINDS:
            raise LadleError(f"model {self.name!r}: unknown kind {self.kind!r} (choose {', '.join(MODEL_KINDS)})")
        if self.max_waiting_requests < 1:
            raise LadleError(f"max_waiting_requests must be at least 1, got {self.max_waiting_requests}")
        if self.max_waiting_prompt_tokens < 1:
            raise LadleError(f"max_waiting_prompt_tokens must be at least 1, got {self.max_waiting_prompt_tokens}")
        if self.idle_unload_s is not None and self.idle_unload_s <= 0:
            raise LadleError(f"idle_unload_s must be positive, got {self.idle_unload_s}")
        if self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise LadleError(
                f"unknown tool call parser {self.tool_call_parser!r} (choose {', '.join(TOOL_CALL_PARSERS)})"
            )
        if self.engine.model.runtime != "torch" and self.kind != "embedding":
            raise LadleError(
                f"model {self.name!r}: runtime {self.engine.model.runtime!r} is for embedding models "
                "(an ONNX file of your own is a kind onnx model)"
            )
        if self.degrade_to == self.name:
            raise LadleError(f"model {self.name!r} cannot degrade to itself")

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class UpstreamConfig:
    """An OpenAI-compatible server (a managed API, another Ladle) requests can fall back to."""

    name: str  # how models' `fallback` names it
    url: str  # its OpenAI base URL, e.g. https://api.openai.com/v1
    model: str | None = None  # the model name sent to it (default: the one requested)
    api_key: str | None = None  # bearer token sent to it
    api_key_env: str | None = None  # ... or the environment variable that holds it
    timeout_s: float = 120.0  # the longest a response (or the gap between streamed chunks) may take
    connect_timeout_s: float = 5.0

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise LadleError(f"upstream {self.name!r}: url must start with http:// or https://, got {self.url!r}")
        if self.api_key and self.api_key_env:
            raise LadleError(f"upstream {self.name!r}: give api_key or api_key_env, not both")


@dataclass(frozen=True)
class RouterConfig:
    """A model name (`auto` by default) that picks the small or the large model per request from
    a score of the request: each sign of a hard request adds its weight."""

    name: str = "auto"  # the name requests use to get routed
    small: str = ""  # the model for easy requests
    large: str = ""  # the model for hard ones
    threshold: float = 1.0  # a score at or above this goes to the large model
    long_prompt_tokens: int = 1500  # a prompt this long (estimated at 4 characters a token) adds 1
    deep_conversation_turns: int = 8  # this many messages add 0.5
    long_output_tokens: int = 1024  # max_tokens this large adds 0.5
    code_weight: float = 1.0  # code in the prompt (fences, keywords, "refactor") adds this much
    math_weight: float = 1.0  # math (equations, proofs) adds this much
    reasoning_weight: float = 1.0  # an explicit ask to reason step by step adds this much

    def __post_init__(self):
        if not self.small or not self.large:
            raise LadleError(f"router {self.name!r} needs a small and a large model")


@dataclass(frozen=True)
class RegistryConfig:
    """How many models may be loaded at once; the least recently used unpinned one is evicted."""

    max_loaded_models: int | None = None  # None: no limit
    max_loaded_gib: float | None = None  # weights + KV cache of the loaded models; None: no limit
    load_wait_s: float = 120.0  # how long a request waits for its model to load before a 503

    def __post_init__(self):
        if self.max_loaded_models is not None and self.max_loaded_models < 1:
            raise LadleError(f"max_loaded_models must be at least 1, got {self.max_loaded_models}")
        if self.max_loaded_gib is not None and self.max_loaded_gib <= 0:
            raise LadleError(f"max_loaded_gib must be positive, got {self.max_loaded_gib}")


@dataclass(frozen=True)
class AdmissionConfig:
    """Admission against latency targets (see docs/serving-layer.md)."""

    enabled: bool = True  # off: every valid request is queued (up to the per-model bounds)
    max_queue_wait_s: float = 30.0  # without a TTFT target: the longest predicted wait admitted
    queue_timeout_s: float | None = None  # a request still waiting this long is dropped with an error
    min_retry_after_s: int = 1  # Retry-After bounds
    max_retry_after_s: int = 60

    def __post_init__(self):
        if self.max_queue_wait_s <= 0:
            raise LadleError(f"--max-queue-wait must be positive, got {self.max_queue_wait_s}")
        if self.queue_timeout_s is not None and self.queue_timeout_s <= 0:
            raise LadleError(f"--queue-timeout must be positive, got {self.queue_timeout_s}")
        if not 1 <= self.min_retry_after_s <= self.max_retry_after_s:
            raise LadleError("need 1 <= min_retry_after_s <= max_retry_after_s")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # address to bind
    port: int = 8000  # TCP port
    api_keys: tuple[str, ...] = ()  # accepted bearer tokens; empty = no authentication
    admin_keys: tuple[str, ...] = ()  # bearer tokens of the admin API; empty = no admin API
    max_request_bytes: int = 8 * 1024 * 1024  # larger bodies get 413
    drain_timeout_s: float = 30.0  # on SIGTERM, how long in-flight requests may still run
    warmup: bool = True  # run a few real forward passes before /ready turns true

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise LadleError(f"--port must be in 0..65535, got {self.port}")
        if self.max_request_bytes < 1024:
            raise LadleError(f"--max-request-bytes must be at least 1024, got {self.max_request_bytes}")
        if set(self.api_keys) & set(self.admin_keys):
            raise LadleError("an admin key may not also be a user API key")
        if self.drain_timeout_s < 0:
            raise LadleError(f"--drain-timeout must be >= 0, got {self.drain_timeout_s}")


@dataclass(frozen=True)
class PriceConfig:
    """What a model's tokens cost, for showback (docs/tenants.md); all prices in one currency."""

    model: str  # the served name of the model that answered
    prompt_per_1k: float = 0.0  # per 1,000 prompt tokens computed (not cached)
    cached_per_1k: float = 0.0  # per 1,000 prompt tokens served from the prefix cache
    completion_per_1k: float = 0.0  # per 1,000 generated tokens
    per_engine_second: float = 0.0  # self-hosted cost: per second of engine compute the request used

    def __post_init__(self):
        for name in ("prompt_per_1k", "cached_per_1k", "completion_per_1k", "per_engine_second"):
            if getattr(self, name) < 0:
                raise LadleError(f"price of {self.model!r}: {name} must be >= 0")


@dataclass(frozen=True)
class MeteringConfig:
    """Tenants, the usage ledger and quotas (docs/tenants.md)."""

    data_dir: str = "~/.local/share/ladle"  # where the default SQLite database lives
    database: str | None = None  # SQLAlchemy URL: sqlite:///FILE or postgresql://...; None: DATA_DIR/ladle.db
    redis: str | None = None  # redis://... : quota counters shared by replicas; None: in this process
    redis_prefix: str = "ladle:quota:"  # the quota counters' keys start with it (deployments sharing one Redis)
    ledger: bool = True  # write one usage row per request
    flush_interval_s: float = 0.25  # the ledger writes its rows at least this often (kill -9 loses at most these)
    share_prefix_cache: bool = False  # tenants may reuse each other's prefix-cache blocks (else salted per tenant)
    prices: tuple[PriceConfig, ...] = ()  # per model, for costs in usage reports and cost budgets
    usage_log: str | None = None  # also append every usage row to this file as a JSON line (None: no file)

    def __post_init__(self):
        if not 0 < self.flush_interval_s <= 1.0:
            raise LadleError(f"flush_interval_s must be in (0, 1], got {self.flush_interval_s}")
        if self.redis is not None and not self.redis.startswith(REDIS_SCHEMES):
            raise LadleError(f"--redis must be a URL starting with {', '.join(REDIS_SCHEMES)}, got {self.redis!r}")
        models = [p.model for p in self.prices]
        if len(set(models)) != len(models):
            raise LadleError("prices: a model is priced twice")

    def price(self, model: str) -> PriceConfig:
        return next((p for p in self.prices if p.model == model), PriceConfig(model))


@dataclass(frozen=True)
class LadleConfig:
    """The whole tree: the server, the models it serves and how requests reach them."""

    models: tuple[ModelEntry, ...] = ()
    server: ServerConfig = field(default_factory=ServerConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()
    routers: tuple[RouterConfig, ...] = ()
    metering: MeteringConfig = field(default_factory=MeteringConfig)
    model_repository: str | None = (
        None  # a folder of tensor models (docs/model-repository.md): each one a kind onnx entry
    )

    def __post_init__(self):
        seen: dict[str, str] = {}
        for kind, name in [("model", n) for m in self.models for n in m.names] + [
            ("router", r.name) for r in self.routers
        ]:
            if name in seen:
                raise LadleError(f"the name {name!r} is used twice ({seen[name]} and {kind})")
            seen[name] = kind
        upstreams = {u.name for u in self.upstreams}
        models = {m.name for m in self.models}
        for m in self.models:
            if m.degrade_to is not None and m.degrade_to not in models:
                raise LadleError(f"model {m.name!r}: degrade_to {m.degrade_to!r} is not a model of this config")
            if m.fallback is not None and m.fallback not in upstreams:
                raise LadleError(f"model {m.name!r}: fallback {m.fallback!r} is not an upstream of this config")
        for r in self.routers:
            for which in (r.small, r.large):
                if which not in models:
                    raise LadleError(f"router {r.name!r}: {which!r} is not a model of this config")

    def model(self, name: str) -> ModelEntry:
        return next(m for m in self.models if name in m.names)
