"""One small generic registry.

Entries are either objects or lazy ``"module:attr"`` strings, so that listing a registry
(``llmmem ls``) never imports torch, vllm or ray. Every pluggable kind (model presets,
pruning methods, backends, suites, unlearning methods) uses this class.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from llmmem.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    name: str
    target: Any  # an object, or "module:attr"
    description: str = ""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, target: Any = None, description: str = ""):
        """Register ``target`` under ``name``; usable as a decorator when target is None."""
        if target is None:
            def deco(obj):
                doc_lines = (obj.__doc__ or "").strip().splitlines()
                self.register(name, obj, description or (doc_lines[0] if doc_lines else ""))
                return obj
            return deco
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = Entry(name, target, description)
        return target

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> Iterator[Entry]:
        for name in self.names():
            yield self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def check(self, name: str) -> str:
        """Return ``name`` if registered, else raise ConfigError listing what is allowed."""
        if name not in self._entries:
            close = difflib.get_close_matches(name, self.names(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}{hint}; choose from: {', '.join(self.names())}"
            )
        return name

    def get(self, name: str) -> T:
        entry = self._entries[self.check(name)]
        target = entry.target
        if isinstance(target, str) and ":" in target:
            module, attr = target.split(":", 1)
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            return obj
        return target

    def describe(self, name: str) -> str:
        return self._entries[self.check(name)].description
