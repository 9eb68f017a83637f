"""One frozen config tree, built once at the edge (CLI, LLM(...)) and passed down; each component
takes only its part. Validation happens here, so a bad flag fails at startup with its name."""

from __future__ import annotations

from dataclasses import dataclass, field

from ladle.errors import LadleError

POLICIES = ("fcfs", "priority")
QUANTIZATION_METHODS = ("none", "int8", "int4", "from-gguf", "w8a8")  # ladle.model.quant implements them


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
    calibration_cache: str | None = "~/.cache/ladle/calibration"  # w8a8's calibration kept here; None: never

    def __post_init__(self):
        check_quantization(self.quantization)


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
    policy: str = "fcfs"  # "fcfs" or "priority" (lower value first, preempting higher values)
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
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    seed: int = 0  # seeds the sampling of requests that bring no seed of their own


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # address to bind
    port: int = 8000  # TCP port
    api_keys: tuple[str, ...] = ()  # accepted bearer tokens; empty = no authentication
    max_request_bytes: int = 8 * 1024 * 1024  # larger bodies get 413
    max_waiting_requests: int = 256  # queued requests beyond this get 429
    drain_timeout_s: float = 30.0  # on SIGTERM, how long in-flight requests may still run
    warmup: bool = True  # run a few real forward passes before /ready turns true

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise LadleError(f"--port must be in 0..65535, got {self.port}")
        if self.max_request_bytes < 1024:
            raise LadleError(f"--max-request-bytes must be at least 1024, got {self.max_request_bytes}")
        if self.max_waiting_requests < 1:
            raise LadleError(f"--max-waiting-requests must be at least 1, got {self.max_waiting_requests}")
        if self.drain_timeout_s < 0:
            raise LadleError(f"--drain-timeout must be >= 0, got {self.drain_timeout_s}")


@dataclass(frozen=True)
class LadleConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
