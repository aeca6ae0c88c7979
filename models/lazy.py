"""Lazy package exports: names are imported from their module on first access.

Packages use it so ``import <package>`` stays cheap and, above all, does not import torch
unless a torch-backed name is used (a serving process must first touch torch in its
inference thread).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` resolving ``name`` from module ``table[name]``."""

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


class Registry(Mapping[str, Any]):
    """Names -> objects, each written as ``"module:attr"`` and imported on first access.

    Listing the names (``list(reg)``, ``name in reg``, :attr:`names`) imports nothing, so a
    torch-free process (config validation, ``--help``) can name the allowed values, and the
    registry stays the one place each name is defined. ``reg[name]`` imports the object.
    """

    def __init__(self, kind: str, entries: Mapping[str, str]) -> None:
        self.kind = kind
        self._entries = dict(entries)

    @property
    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def __getitem__(self, name: str) -> Any:
        module, _, attr = self._entries[name].partition(":")
        return getattr(importlib.import_module(module), attr)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def require(self, name: str) -> Any:
        """``self[name]``, or ValueError naming the kind, the bad name and the allowed names."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self._entries)}")
        return self[name]
