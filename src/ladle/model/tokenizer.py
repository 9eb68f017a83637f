"""Tokenizer: a `tokenizers` fast tokenizer plus what the model files say around it.

Built from a Hugging Face folder (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`,
`generation_config.json`) or from GGUF metadata (see gguf_tokenizer.py). Plain Python: the engine
and the server use it without loading torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers

from ladle.errors import InvalidRequestError, ModelLoadError
from ladle.model.chat_template import ChatTemplate


@dataclass(frozen=True)
class SpecialTokens:
    bos_token: str | None  # text of the begin-of-sequence token
    eos_token: str | None  # text of the end-of-sequence token
    add_bos: bool  # plain-text encoding starts with BOS
    add_eos: bool  # plain-text encoding ends with EOS
    stop_token_ids: tuple[int, ...]  # every id that ends generation (EOS, end-of-turn, ...)


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, special: SpecialTokens, chat_template: str | None):
        self.backend = backend
        self.special = special
        self.bos_token_id = backend.token_to_id(special.bos_token) if special.bos_token else None
        self.eos_token_id = backend.token_to_id(special.eos_token) if special.eos_token else None
        self.stop_token_ids = special.stop_token_ids
        self.chat_template = ChatTemplate(chat_template) if chat_template else None
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    # -- text ↔ ids ---------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            if self.special.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
                ids.insert(0, self.bos_token_id)
            if self.special.add_eos and self.eos_token_id is not None and ids[-1:] != [self.eos_token_id]:
                ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def validate_ids(self, ids: Sequence[int], param: str = "prompt") -> None:
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"{param} holds token ids outside the vocabulary (0..{self.vocab_size - 1}): {bad[:5]}", param=param
            )

    # -- chat ----------------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        if self.chat_template is None:
            raise InvalidRequestError(
                "this model has no chat template: use the completions endpoint (or --chat off)", param="messages"
            )
        return self.chat_template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.special.bos_token or "",
            eos_token=self.special.eos_token or "",
            **variables,
        )

    def encode_chat(self, messages: list[dict[str, Any]], **variables: Any) -> list[int]:
        """Token ids of a rendered conversation. The template writes its own BOS where the model
        wants one, so no special tokens are added on top."""
        return self.encode(self.apply_chat_template(messages, **variables), add_special_tokens=False)


# -- Hugging Face folders ----------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(path, f"not valid JSON ({e})") from None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config files
        return value.get("content")
    return value


def _template_source(folder: Path, config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = by_name.get("default") or next(iter(by_name.values()), None)
    if template is None and (folder / "chat_template.json").exists():
        template = _read_json(folder / "chat_template.json").get("chat_template")
    return template


def stop_ids(backend: tokenizers.Tokenizer, eos_token: str | None, *more: Sequence[int]) -> tuple[int, ...]:
    ids: list[int] = []
    eos_id = backend.token_to_id(eos_token) if eos_token else None
    for i in ([eos_id] if eos_id is not None else []) + [i for group in more for i in group]:
        if i not in ids:
            ids.append(int(i))
    return tuple(ids)


def load_hf_tokenizer(folder: Path, model_eos_ids: Sequence[int] = ()) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.exists():
        raise ModelLoadError(folder, "no tokenizer.json in the model folder (Ladle needs a fast tokenizer)")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions for bad files
        raise ModelLoadError(path, f"cannot be read as a tokenizer ({e})") from None
    config = _read_json(folder / "tokenizer_config.json")
    generation = _read_json(folder / "generation_config.json")
    gen_eos = generation.get("eos_token_id")
    gen_eos = gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else [])
    eos_token = _token_text(config.get("eos_token"))
    special = SpecialTokens(
        bos_token=_token_text(config.get("bos_token")),
        eos_token=eos_token,
        add_bos=bool(config.get("add_bos_token", False)),
        add_eos=bool(config.get("add_eos_token", False)),
        stop_token_ids=stop_ids(backend, eos_token, gen_eos, model_eos_ids),
    )
    return Tokenizer(backend, special, _template_source(folder, config))
