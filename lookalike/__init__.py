"""lookalike: image retrieval by metric learning (entry point package: the CLI)."""

from importlib.metadata import PackageNotFoundError, version

try:  # one source: pyproject.toml's version, as installed
    __version__ = version("lookalike")
except PackageNotFoundError:
    __version__ = "0+unknown"
