"""The wire format: OpenAI's request bodies (plus vLLM's extra sampling fields), validated by
pydantic, and their translation into engine terms. Responses are plain dicts built in the routes."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ladle.errors import InvalidRequestError
from ladle.sample.params import SamplingParams, StructuredOutput


class StreamOptions(BaseModel):
    include_usage: bool = False  # a last chunk with the usage of the whole request


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint on the output."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    json_schema: dict[str, Any] | str | None = Field(default=None, alias="json")  # a JSON schema
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark or GBNF
    json_object: bool | None = None  # any JSON object

    def constraints(self, param: str) -> list[StructuredOutput]:
        found = []
        if self.json_schema is not None:
            schema = self.json_schema if isinstance(self.json_schema, str) else json.dumps(self.json_schema)
            found.append(StructuredOutput("json", schema, param))
        if self.regex is not None:
            found.append(StructuredOutput("regex", self.regex, param))
        if self.choice is not None:
            found.append(StructuredOutput("choice", json.dumps(self.choice), param))
        if self.grammar is not None:
            found.append(StructuredOutput("grammar", self.grammar, param))
        if self.json_object:
            found.append(StructuredOutput("json_object", "", param))
        return found


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> StructuredOutput | None:
        if self.type == "json_object":
            return StructuredOutput("json_object", "", "response_format")
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.json_schema is None:
                raise InvalidRequestError(
                    'response_format of type "json_schema" needs json_schema.schema', param="response_format"
                )
            return StructuredOutput("json", json.dumps(self.json_schema.json_schema), "response_format")
        return None


class SamplingFields(BaseModel):
    """Fields common to completions and chat completions."""

    model_config = ConfigDict(extra="ignore")  # clients send fields Ladle does not use (user, store, ...)

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    cache_salt: str | None = None
    # Ladle's: false = no speculative decoding for this request (when the server speculates)
    speculative: bool = True
    # constrained decoding: OpenAI's response_format, vLLM's structured_outputs and older guided_*
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Ladle's: seconds the request may wait in the queue before it fails (default: --queue-timeout)
    queue_timeout: float | None = Field(default=None, gt=0)

    def structured(self) -> StructuredOutput | None:
        """The request's one output constraint, from whichever field gave it (400 for two)."""
        found = []
        if self.response_format is not None and (c := self.response_format.constraint()) is not None:
            found.append(c)
        if self.structured_outputs is not None:
            found += self.structured_outputs.constraints("structured_outputs")
        legacy = StructuredOutputs(json=self.guided_json, regex=self.guided_regex, choice=self.guided_choice,
                                   grammar=self.guided_grammar)  # fmt: skip
        found += [StructuredOutput(c.kind, c.spec, f"guided_{c.kind}") for c in legacy.constraints("guided")]
        if len(found) > 1:
            raise InvalidRequestError(
                f"give one output constraint, got {len(found)} ({', '.join(c.param for c in found)})",
                param=found[1].param,
            )
        return found[0] if found else None

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            logit_bias=bias,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else tuple(self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            speculative=self.speculative,
            structured=self.structured(),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False  # the prompt before the completion (with logprobs: the prompt's logprobs first)
    suffix: str | None = None
    best_of: int | None = None
    # vLLM's: per prompt token its logprob and this many alternatives, in the choice's `prompt_logprobs`
    # (echo with logprobs asks for them too, at logprobs alternatives)
    prompt_logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of other than n is not supported"
        return None

    def check_max_tokens(self) -> None:
        """max_tokens 0 asks for the prompt alone (scored, with logprobs): only with echo, as in vLLM."""
        if self.max_tokens is not None and self.max_tokens < 1 and not (self.echo and self.max_tokens == 0):
            raise InvalidRequestError(
                f"max_tokens must be at least 1, got {self.max_tokens} (0 is allowed with echo: the prompt "
                "alone, with its logprobs when logprobs is set)",
                param="max_tokens",
            )

    @property
    def prompt_logprobs_count(self) -> int | None:
        """Alternatives per prompt token the engine computes (None: no prompt logprobs). echo with
        max_tokens 0 and no logprobs still runs the prompt as a scoring request (with none)."""
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            return self.logprobs
        if self.echo and self.max_tokens == 0:
            return 0
        return None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [p]
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... reach the template as given
    role: str
    content: str | list[ContentPart] | None = None

    def as_template_dict(self) -> dict[str, Any]:
        d = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            texts = []
            for part in self.content:
                if part.type != "text":
                    raise InvalidRequestError(
                        f"message content of type {part.type!r} is not supported: this model reads text only",
                        param="messages",
                    )
                texts.append(part.text or "")
            d["content"] = "".join(texts)
        return d


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")  # strict, ...
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Any = None  # "none", "auto", "required" or {"type": "function", "function": {"name"}}: see tools.py
    parallel_tool_calls: bool = True  # false: at most one call per answer
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    echo: bool = False  # refused: a field of /v1/completions

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", (
                "echo is not supported on chat completions; use /v1/completions with echo (and logprobs for "
                "the prompt's logprobs)"
            )
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs to be true"
        return None

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ToolDefinition] | None = None  # rendered with messages, as chat completions render them
    tool_choice: Any = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]
