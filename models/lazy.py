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
