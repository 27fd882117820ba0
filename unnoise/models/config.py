"""Typed model configuration: a dataclass per model whose fields are exactly what ``config.json`` holds."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C", bound="ModelConfig")


def _plain(value: Any) -> Any:
    """Tuples become lists for JSON; everything else is already plain."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _restore(value: Any, annotation: Any) -> Any:
    """Lists from JSON become tuples where the field is declared as a tuple (also inside ``X | None``)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(annotation):
            if arm is not type(None) and value is not None:
                return _restore(value, arm)
        return value
    if (origin is tuple or annotation is tuple) and isinstance(value, list):
        args = typing.get_args(annotation)
        inner = args[0] if args else Any
        return tuple(_restore(v, inner) for v in value)
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Base for model configs: JSON round trip; unknown keys are errors that name them."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; allowed keys: {sorted(names)}")
        return cls(**{k: _restore(v, hints[k]) for k, v in data.items()})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        return cls.from_dict(json.loads(Path(path).read_text()))
