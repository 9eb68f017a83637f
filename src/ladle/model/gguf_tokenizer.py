"""Build a `tokenizers` fast tokenizer from the vocabulary a GGUF file carries in its metadata.

A GGUF file has no tokenizer.json: llama.cpp stores the pieces (`tokenizer.ggml.tokens`), their
kinds (`token_type`), merges or scores, and names the pre-tokenizer (`tokenizer.ggml.pre`). Two
vocabulary kinds cover the Llama family:

- "gpt2": byte-level BPE. Merges are given; text is split by the pre-tokenizer's regexes (which
  differ per model family: digits alone for SmolLM, groups of three for Llama 3, ...) and then
  mapped byte-by-byte to the printable alphabet of GPT-2.
- "llama": SentencePiece BPE with byte fallback. No merges are stored: they follow from the scores
  (the pair whose joined piece scores highest merges first), spaces are written as "▁", and a
  space is prepended to the text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as FastTokenizer

from ladle.errors import ModelLoadError
from ladle.model.tokenizer import SpecialTokens, Tokenizer, stop_ids

log = logging.getLogger(__name__)

# llama.cpp token kinds (llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# `tokenizer.ggml.pre` → the regexes applied in turn before the byte-level mapping (llama.cpp's
# pre-tokenizer families). Llama 3's vocabulary also matches whole words before merging.
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": ((_GPT2_SPLIT,), False),
    "gpt2": ((_GPT2_SPLIT,), False),
    "gpt-2": ((_GPT2_SPLIT,), False),
    "smollm": ((r"\p{N}", _GPT2_SPLIT), False),
    "starcoder": ((r"\p{N}", _GPT2_SPLIT), False),
    "refact": ((r"\p{N}", _GPT2_SPLIT), False),
    "llama3": ((_LLAMA3_SPLIT,), True),
    "llama-v3": ((_LLAMA3_SPLIT,), True),
    "llama-bpe": ((_LLAMA3_SPLIT,), True),
    "smaug-bpe": ((_LLAMA3_SPLIT,), True),
    "falcon3": ((_LLAMA3_SPLIT,), True),
    "qwen2": ((_QWEN2_SPLIT,), False),
    "deepseek-r1-qwen": ((_QWEN2_SPLIT,), False),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def spm_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece BPE vocabulary: every split of a piece into two pieces of
    the vocabulary, best-scoring joined piece first (ties: longer left part, then longer right)."""
    ids = {t: i for i, t in enumerate(tokens)}
    candidates = []
    for piece, score in zip(tokens, scores, strict=True):
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in ids and piece[i:] in ids]
        local.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
        candidates.extend((left, right, score) for left, right in local)
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _byte_level_model(meta: dict[str, Any], tokens: list[str], types: list[int], source: object):
    merges_raw = meta.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise ModelLoadError(source, "GGUF byte-level (gpt2) vocabulary has no tokenizer.ggml.merges")
    alphabet = set(bytes_to_unicode().values())
    spell = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        # Pieces are spelled in GPT-2's byte alphabet; added/control tokens keep their own text.
        if kind in (NORMAL, UNUSED) and not set(tok) <= alphabet:
            tok = "".join(spell[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    pre_name = meta.get("tokenizer.ggml.pre") or "default"
    if pre_name not in PRE_TOKENIZERS:
        log.warning("%s: unknown pre-tokenizer %r, splitting text as GPT-2 does", source, pre_name)
        pre_name = "default"
    splits, ignore_merges = PRE_TOKENIZERS[pre_name]
    model = models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges)
    tokenizer = FastTokenizer(model)
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_model(meta: dict[str, Any], tokens: list[str], types: list[int], source: object):
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ModelLoadError(source, "GGUF SentencePiece (llama) vocabulary has no scores for its tokens")
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    if unk_id is None:
        unk_id = next((i for i, k in enumerate(types) if k == UNKNOWN), None)
    unk = tokens[unk_id] if unk_id is not None else None
    model = models.BPE(vocab=vocab, merges=spm_merges(tokens, scores), unk_token=unk, fuse_unk=True, byte_fallback=True)
    tokenizer = FastTokenizer(model)
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


_BUILDERS = {"gpt2": _byte_level_model, "llama": _sentencepiece_model}


def tokenizer_from_gguf(meta: dict[str, Any], source: object, model_eos_ids: Sequence[int] = ()) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind not in _BUILDERS:
        raise ModelLoadError(
            source, f"unsupported GGUF tokenizer model {kind!r} (supported: {', '.join(sorted(_BUILDERS))})"
        )
    if not tokens:
        raise ModelLoadError(source, "GGUF file has no tokenizer.ggml.tokens")
    tokens = list(tokens)
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    backend = _BUILDERS[kind](meta, tokens, types, source)
    # Control tokens (<|im_end|>, <s>) and user-defined ones (<think>) match whole in the text.
    kinds = list(zip(tokens, types, strict=True))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in kinds if k == CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in kinds if k == USER_DEFINED])

    def token_at(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    eos = token_at("eos_token_id")
    eot_ids = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
    special = SpecialTokens(
        bos_token=token_at("bos_token_id"),
        eos_token=eos,
        # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        stop_token_ids=stop_ids(backend, eos, eot_ids, model_eos_ids),
    )
    return Tokenizer(backend, special, meta.get("tokenizer.chat_template"))
