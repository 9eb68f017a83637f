"""Chat templates: the model's own Jinja template, rendered in a sandbox.

Templates come from model files written by strangers, so they run in Jinja's immutable sandbox:
no attribute access to Python internals, no mutation of the objects passed in.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ladle.errors import InvalidRequestError


class ChatTemplateError(InvalidRequestError):
    """The template refused the conversation (its own `raise_exception`) or failed to render."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the model's chat template refused the conversation: {message}", param="messages")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled template. Compiling checks the syntax, so a broken template fails at load time."""

    def __init__(self, source: str):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source = source
        self._template = env.from_string(source)

    def render(self, messages: list[dict[str, Any]], **variables: Any) -> str:
        """Render `messages` (OpenAI-style dicts) with the template's variables
        (`add_generation_prompt`, `bos_token`, `eos_token`, `tools`, ...)."""
        try:
            return self._template.render(messages=messages, **variables)
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise ChatTemplateError(f"the model's chat template failed to render: {e}", param="messages") from None
