"""Building an engine from a config, and the synchronous offline API:

llm = LLM()                                    # the embedded model
results = llm.generate(["Hello"], SamplingParams(max_tokens=32))
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

from ladle.config import EngineConfig
from ladle.engine.core import EngineCore, EngineInfo
from ladle.engine.outputs import GenerationResult
from ladle.sample.params import SamplingParams

log = logging.getLogger(__name__)


def build_engine(config: EngineConfig, loaded=None, between=None) -> EngineCore:
    """Load the model (unless a loaded one is given: engines may share weights), size the KV cache,
    and wire runner and engine together. between: called between pieces of the load (a compute
    loop's `share`, so the engines already serving keep stepping)."""
    from ladle.model.loader import load_model
    from ladle.model.source import resolve_model
    from ladle.runner.memory import num_kv_blocks
    from ladle.runner.model_runner import KVCache, ModelRunner, prefill_hidden_states

    mc = config.model
    if loaded is None:
        loaded = load_model(
            resolve_model(mc.model, mc.served_name),
            mc.dtype,
            mc.device,
            mc.attention_backend,
            mc.max_model_len,
            mc.quantization,
            calibration_cache=mc.calibration_cache,
            calibration_forward=prefill_hidden_states,
            between=between,
        )
    bs = config.cache.block_size
    max_len = min(loaded.max_model_len, mc.max_model_len or loaded.max_model_len)
    draft = load_draft(config, loaded, max_len, between) if config.speculative.method == "draft" else None
    bytes_per_block = KVCache.bytes_per_block(loaded, bs) + (KVCache.bytes_per_block(draft, bs) if draft else 0)
    blocks = num_kv_blocks(
        bytes_per_block,
        bs,
        loaded.device,
        config.cache.kv_cache_memory_gib,
        max_len,
        config.scheduler.max_num_seqs,
    )
    runner = ModelRunner(loaded, num_blocks=blocks, block_size=bs, seed=config.seed, draft=draft)
    log.info("KV cache: %d blocks of %d tokens (%d tokens)", blocks, bs, blocks * bs)
    info = EngineInfo(
        model_name=loaded.source.name,
        dtype=str(loaded.dtype).removeprefix("torch."),
        device=str(loaded.device),
        max_model_len=max_len,
        num_kv_blocks=blocks,
        block_size=bs,
        attention_backend=loaded.attention_backend,
        quantization=loaded.quantization,
        weight_bytes=_tensor_bytes(loaded.model) + (_tensor_bytes(draft.model) if draft else 0),
        kv_cache_bytes=blocks * bytes_per_block,
    )
    return EngineCore(config, runner, loaded.tokenizer, max_len, blocks, loaded.source.name, info,
                      loaded.spec.vocab_size)  # fmt: skip


def _tensor_bytes(module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}  # shared ones once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def load_draft(config: EngineConfig, target, max_len: int, between=None):
    """The draft model of `--speculative draft`, checked against the target at startup: same
    vocabulary (token for token), context at least max_len. Same dtype, device and attention."""
    from ladle.errors import LadleError
    from ladle.model.loader import load_model
    from ladle.model.source import resolve_model

    path = config.speculative.draft_model
    source = resolve_model(path)
    draft = load_model(source, config.model.dtype, config.model.device, config.model.attention_backend, between=between)
    t_vocab = target.tokenizer.backend.get_vocab(with_added_tokens=True)
    d_vocab = draft.tokenizer.backend.get_vocab(with_added_tokens=True)
    if t_vocab != d_vocab:
        differ = sorted(set(t_vocab.items()) ^ set(d_vocab.items()), key=lambda kv: kv[1])[:3]
        raise LadleError(
            f"draft model {path} has a different tokenizer: {len(d_vocab)} tokens against the target's "
            f"{len(t_vocab)}, first differences {differ}. Use a draft of the same model family."
        )
    if draft.spec.vocab_size != target.spec.vocab_size:
        raise LadleError(
            f"draft model {path} has {draft.spec.vocab_size} output rows, the target {target.spec.vocab_size}: "
            "the vocabularies must be the same size"
        )
    if draft.max_model_len < max_len:
        raise LadleError(
            f"draft model {path} handles {draft.max_model_len} tokens of context, fewer than the target's "
            f"{max_len}: lower --max-model-len"
        )
    return draft


class LLM:
    """Offline batch generation: all prompts go in at once and are batched continuously.

    Takes every engine option by its config field's name, with the config's defaults:
    `LLM("model.gguf", quantization="w8a8", kv_cache_memory_gib=1, max_num_seqs=32)`, a
    `speculative=SpeculativeConfig(...)`, or a whole `config=EngineConfig(...)`."""

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, loaded=None, **options):
        from ladle.config_file import from_options

        if config is not None and (options or model is not None):
            raise TypeError("give config=EngineConfig(...) or options, not both")
        self.config = config or from_options(EngineConfig, {"model": model, **options}, "LLM()")
        self.engine = build_engine(self.config, loaded)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        priorities: Sequence[int] | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt (text, or token ids); results come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        results: dict[str, GenerationResult] = {}
        for i, (prompt, p) in enumerate(zip(prompts, params_list, strict=True)):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = f"gen-{next(self._ids)}"
            self.engine.add_request(rid, ids, p, priority=priorities[i] if priorities else 0)
            results[rid] = GenerationResult(rid, prompt if isinstance(prompt, str) else None, ids)
        while self.engine.has_unfinished():
            for delta in self.engine.step():
                results[delta.request_id].add(delta)
        return list(results.values())

    def chat(self, conversations, params: SamplingParams | None = None) -> list[GenerationResult]:
        """Generate replies to conversations (lists of {"role", "content"} messages)."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([self.tokenizer.encode_chat(c) for c in conversations], params)
