"""The shape of a decoder-only transformer, read from a Hugging Face `config.json` or GGUF metadata.

Plain Python (no torch), so the engine can size its KV cache and check context lengths without
loading weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ladle.errors import ModelLoadError

# Hugging Face `architectures[0]` → Ladle's architecture family (a key of ladle.model.registry).
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
# GGUF `general.architecture` → family. llama.cpp writes Mistral models as "llama".
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0  # context extension factor (linear, llama3)
    low_freq_factor: float = 1.0  # llama3: wavelengths above original_ctx / low_freq_factor are scaled
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_ctx / high_freq_factor are kept
    original_max_position_embeddings: int = 8192  # llama3: the context length before extension


@dataclass(frozen=True)
class TransformerSpec:
    architecture: str  # family key: "llama" or "qwen2"
    vocab_size: int  # rows of the embedding and the lm_head
    hidden_size: int  # residual stream width
    intermediate_size: int  # SwiGLU inner width
    num_layers: int  # decoder blocks
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (grouped-query attention when < num_heads)
    head_dim: int  # width of one head
    rms_norm_eps: float  # RMSNorm epsilon
    rope_theta: float  # RoPE base frequency
    max_position_embeddings: int  # context length the model was trained for
    tie_word_embeddings: bool  # lm_head shares the embedding matrix
    attention_bias: bool = False  # q/k/v projections have a bias (Qwen2)
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    bos_token_id: int | None = None  # from the model config; the tokenizer may override
    eos_token_ids: tuple[int, ...] = ()  # ids that end generation, from the model config

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def validate(self, source: object) -> TransformerSpec:
        problems = []
        if self.num_heads <= 0 or self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if problems:
            raise ModelLoadError(source, "invalid model shape: " + "; ".join(problems))
        return self


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _rope_from_hf(cfg: dict[str, Any], source: object) -> tuple[float, RopeScaling]:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`.
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        supported = ", ".join(ROPE_TYPES)
        raise ModelLoadError(source, f"unsupported rope scaling type {rope_type!r} (supported: {supported})")
    default = RopeScaling()
    scaling = RopeScaling(
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", default.low_freq_factor)),
        high_freq_factor=float(params.get("high_freq_factor", default.high_freq_factor)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", default.original_max_position_embeddings)
        ),
    )
    return theta, scaling


def spec_from_hf_config(cfg: dict[str, Any], source: object) -> TransformerSpec:
    """Read a Hugging Face `config.json` (already parsed)."""
    archs = cfg.get("architectures") or []
    family = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    if family is None:
        named = ", ".join(archs) or f"model_type={cfg.get('model_type')!r}"
        raise ModelLoadError(
            source, f"unsupported architecture {named} (supported: {', '.join(sorted(HF_ARCHITECTURES))})"
        )
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        theta, scaling = _rope_from_hf(cfg, source)
        max_pos = int(cfg.get("max_position_embeddings", 2048))
        # Mistral's sliding window equals full attention while the context fits in the window, so
        # Ladle serves such a model with its context capped at the window instead of approximating.
        window = cfg.get("sliding_window")
        if window and (family == "llama" or cfg.get("use_sliding_window")):
            max_pos = min(max_pos, int(window))
        spec = TransformerSpec(
            architecture=family,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
            rope_scaling=scaling,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_as_ids(cfg.get("eos_token_id")),
        )
    except KeyError as e:
        raise ModelLoadError(source, f"config is missing the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ModelLoadError(source, f"config has a malformed field: {e}") from None
    return spec.validate(source)


def spec_from_gguf_metadata(meta: dict[str, Any], source: object, has_output_weight: bool) -> TransformerSpec:
    """Read the `{arch}.*` keys of a GGUF file (values already decoded to Python)."""
    arch = meta.get("general.architecture")
    family = GGUF_ARCHITECTURES.get(arch)
    if family is None:
        raise ModelLoadError(
            source, f"unsupported GGUF architecture {arch!r} (supported: {', '.join(sorted(GGUF_ARCHITECTURES))})"
        )

    def key(name: str, default: Any = KeyError) -> Any:
        full = f"{arch}.{name}"
        if full in meta:
            return meta[full]
        if default is KeyError:
            raise ModelLoadError(source, f"GGUF metadata is missing {full!r}")
        return default

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", key("rope.dimension_count", hidden // heads)))
    scaling_type = key("rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        # llama3-style scaling comes as a `rope_freqs.weight` tensor, read by the loader.
        raise ModelLoadError(source, f"unsupported GGUF rope scaling type {scaling_type!r}")
    scaling = RopeScaling()
    if scaling_type == "linear":
        scaling = RopeScaling(rope_type="linear", factor=float(key("rope.scaling.factor", 1.0)))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(key("vocab_size", len(tokens) if tokens is not None else 0))
    spec = TransformerSpec(
        architecture=family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        max_position_embeddings=int(key("context_length", 2048)),
        tie_word_embeddings=not has_output_weight,
        attention_bias=family == "qwen2",
        rope_scaling=scaling,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_as_ids(meta.get("tokenizer.ggml.eos_token_id")),
    )
    return spec.validate(source)
