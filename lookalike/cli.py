"""The ``lookalike`` command. Each package contributes its subcommands through a
``register(subparsers)`` function in its own ``cli`` module (kept import-light); the
heavy imports happen inside the handlers. A package whose dependencies are missing (a
torch-free serving install has no ``training``) simply contributes nothing.

User errors (bad values, missing or bad files) end with ``lookalike: error: <message>``
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

_COMMAND_MODULES = ("training.cli", "index.cli", "service.cli")


def build_parser() -> argparse.ArgumentParser:
    from lookalike import __version__

    parser = argparse.ArgumentParser(prog="lookalike", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"lookalike {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # e.g. a serving install without torch
            logging.getLogger(__name__).debug("commands of %s unavailable: %s", name, exc)
            continue
        mod.register(sub)
    return parser


def wire_feedback() -> None:
    """Let training read relevance feedback from an index: training's dependencies point to
    models only, so the command, which may import both, hands it index's reader."""
    from index.feedback import read_feedback
    from training.feedback import set_feedback_reader

    set_feedback_reader(read_feedback)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else getattr(logging, os.environ.get("LOOKALIKE_LOG", "INFO").upper(), 20),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if args.command in ("train", "eval"):
            wire_feedback()
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("lookalike: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, RuntimeError) as exc:
        # RuntimeError covers our own refusals (locks, verification); torch internals raise
        # it too, and a one-line message is still the right thing for a CLI user.
        if args.verbose:
            raise
        print(f"lookalike: error: {exc}", file=sys.stderr)
        return 2
