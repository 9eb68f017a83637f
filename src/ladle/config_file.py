"""`ladle serve --config ladle.yaml`: a YAML file parsed into the frozen dataclasses of
`ladle.config`, the same tree the flags build.

The mapping follows the dataclasses: a nested mapping fills a nested dataclass, a list fills a
tuple, and the fields of a field marked `INLINE` are read from the parent's mapping (a model entry
says `quantization: w8a8`, not `engine: {model: {quantization: w8a8}}`). Every error names the
file and the key's path: `ladle.yaml: models[1].max_num_seq: unknown key (did you mean
max_num_seqs?)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path

from ladle.config import LadleConfig
from ladle.errors import LadleError


class ConfigFileError(LadleError):
    pass


def load_config_file(path: str | Path) -> LadleConfig:
    import yaml

    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigFileError(f"cannot read the config file {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigFileError(f"{path}: not valid YAML: {e}") from None
    return parse_config(data if data is not None else {}, str(path))


def parse_config(data, source: str = "config") -> LadleConfig:
    """The LadleConfig a mapping (a parsed file) describes; errors name `source` and the key."""
    return _build(LadleConfig, data, _Where(source, ""))


def from_options(cls, options: dict, source: str):
    """A config dataclass from flat keyword options, read as a config file's mapping would be
    (inline fields flattened; a nested dataclass may be given as an instance): how `LLM(...)`
    takes every engine option with the dataclasses' own defaults."""
    return _build(cls, options, _Where(source, ""))


@dataclasses.dataclass(frozen=True)
class _Where:
    source: str
    path: str

    def key(self, name: str) -> _Where:
        return _Where(self.source, f"{self.path}.{name}" if self.path else name)

    def item(self, index: int) -> _Where:
        return _Where(self.source, f"{self.path}[{index}]")

    def error(self, message: str) -> ConfigFileError:
        return ConfigFileError(f"{self.source}: {self.path or '(top level)'}: {message}")


def _fields(cls) -> list[tuple[dataclasses.Field, object]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _keys(cls) -> set[str]:
    """The keys a mapping for cls may hold (inline fields contribute theirs)."""
    keys = set()
    for f, hint in _fields(cls):
        keys |= _keys(hint) if f.metadata.get("inline") else {f.name}
    return keys


def _build(cls, data, where: _Where):
    if not isinstance(data, dict):
        raise where.error(f"expected a mapping of {cls.__name__}'s keys, got {_kind(data)}")
    allowed = _keys(cls)
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known keys: {', '.join(sorted(allowed))})"
            raise where.key(str(key)).error(f"unknown key{hint}")
    return _construct(cls, data, where)


def _construct(cls, data: dict, where: _Where):
    kwargs = {}
    for f, hint in _fields(cls):
        if f.metadata.get("inline"):
            kwargs[f.name] = _construct(hint, data, where)
        elif f.name in data:
            kwargs[f.name] = _value(hint, data[f.name], where.key(f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise where.key(f.name).error("required key is missing")
    try:
        return cls(**kwargs)
    except LadleError as e:
        raise where.error(str(e)) from None


def _value(hint, value, where: _Where):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(inner, value, where)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else _build(hint, value, where)
    if origin is tuple:
        if isinstance(value, str) and args[0] is str:
            value = [value]  # `aliases: fast` is one alias
        if not isinstance(value, list):
            raise where.error(f"expected a list, got {_kind(value)}")
        return tuple(_value(args[0], v, where.item(i)) for i, v in enumerate(value))
    return _scalar(hint, value, where)


def _scalar(hint, value, where: _Where):
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and number and isinstance(value, int):
        return value
    if hint is float and number:
        return float(value)
    if hint is str and (number or isinstance(value, str)):
        return str(value)
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint)
    if expected is None:
        raise where.error(f"cannot read a value of type {hint}")  # a field type this loader does not know
    raise where.error(f"expected {expected}, got {_kind(value)}")


def _kind(value) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"
