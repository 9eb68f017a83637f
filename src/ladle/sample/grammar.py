"""Constrained decoding with llguidance: a request's `StructuredOutput` (JSON schema, any JSON
object, regex, choice, Lark or GBNF grammar) becomes a matcher that says, at every step, which
tokens may come next.

`GrammarCompiler` (one per engine, for its tokenizer) compiles a constraint once and caches the
start-state matcher by the constraint; every sample gets its own copy. Compiling runs on a thread
of its own (`compile_async`, awaited by the server before the request reaches the engine), so
the engine's loop never waits on a new schema. A grammar the library rejects raises
InvalidRequestError naming the request's field.

Per step, the sampler fills a bit per vocabulary entry for the constrained rows only, from their
matchers, and sets their disallowed logits to -inf (sampler.py `fill_masks`, `apply_masks`); the
engine advances each matcher by the tokens it keeps. No torch here: the engine holds these.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from ladle.errors import InvalidRequestError
from ladle.sample.params import StructuredOutput

# JSON as json.dumps writes it: flexible whitespace lets a small model pad forever
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_text(structured: StructuredOutput) -> str:
    """The constraint as an llguidance grammar (not yet checked)."""
    from llguidance import LLMatcher, gbnf_to_lark

    kind, spec = structured.kind, structured.spec
    if kind in ("json", "json_object"):
        schema = spec if kind == "json" else '{"type": "object"}'
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise _invalid(structured, f"the JSON schema is not a JSON object: {e}") from None
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        try:
            choices = json.loads(spec)
        except json.JSONDecodeError:
            choices = None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise _invalid(structured, "choice must be a non-empty list of strings")
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    lark = gbnf_to_lark(spec) if "::=" in spec else spec  # GBNF (llama.cpp, xgrammar) or Lark
    return LLMatcher.grammar_from_lark(lark)


def _invalid(structured: StructuredOutput, problem: str) -> InvalidRequestError:
    return InvalidRequestError(f"invalid {structured.kind} constraint: {problem}", param=structured.param)


class GrammarCompiler:
    """Compiled constraints for one tokenizer, cached by constraint (least recently used out)."""

    def __init__(self, backend, vocab_size: int, eos_token_ids: Sequence[int], cache_size: int = 512):
        self._backend = backend  # the `tokenizers.Tokenizer` the model's Tokenizer wraps
        self.vocab_size = vocab_size  # the model's logits width (may exceed the tokenizer's)
        self._eos = list(eos_token_ids)
        self._cache_size = cache_size
        self._cache: OrderedDict[StructuredOutput, object] = OrderedDict()
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        self._pool: ThreadPoolExecutor | None = None
        self.num_compiled = 0  # constraints compiled (cache misses)
        self.compile_s = 0.0  # time spent compiling them

    @property
    def ll_tokenizer(self):
        """llguidance's view of the tokenizer (built once, about a second for a 50k vocabulary)."""
        with self._lock:
            if self._ll_tokenizer is None:
                from llguidance import LLTokenizer

                self._ll_tokenizer = LLTokenizer(self._backend.to_str(), n_vocab=self.vocab_size, eos_token=self._eos)
            return self._ll_tokenizer

    def compile(self, structured: StructuredOutput):
        """The start-state matcher of a constraint (cached; do not advance it: see `matcher`)."""
        with self._lock:
            if structured in self._cache:
                self._cache.move_to_end(structured)
                return self._cache[structured]
        from llguidance import LLMatcher

        started = time.perf_counter()
        tokenizer = self.ll_tokenizer
        grammar = grammar_text(structured)
        error = LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise _invalid(structured, error)
        matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise _invalid(structured, matcher.get_error())
        with self._lock:
            self.num_compiled += 1
            self.compile_s += time.perf_counter() - started
            self._cache[structured] = matcher
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher

    def compile_async(self, structured: StructuredOutput) -> Future:
        """compile() on the compiler's thread (the caller awaits the future, not the engine)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="ladle-grammar")
            pool = self._pool
        return pool.submit(self.compile, structured)

    def matcher(self, structured: StructuredOutput):
        """A matcher of its own for one sample, in the start state."""
        return self.compile(structured).deep_copy()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
