"""lookalike: image retrieval by metric learning (entry point package: the CLI)."""

__version__ = "0.1.0"
