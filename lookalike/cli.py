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

DESCRIPTION = """\
Find the images that look like a given one. lookalike trains an embedding on a folder of
labelled images (one sub-folder per class), indexes folders of images with it, and answers
"which images look like this one?" over REST and on a search page."""

EXAMPLES = """\
examples:
  lookalike train --data.root photos/ --out runs/mine      train (8-minute budget; ends with R@1 vs zero-shot)
  lookalike eval --model runs/mine                         metrics and a report (PNG/HTML)
  lookalike index build --model runs/mine --images photos/ --out my-index --labels-from-folders
  lookalike index search my-index query.jpg -k 10          ranked paths and cosine scores
  lookalike serve --model runs/mine --index my-index       REST API and search page on http://127.0.0.1:8000/
  lookalike export --pretrained efficientnet_lite0 --out models/lite0   no labels: a pretrained model

Run 'lookalike COMMAND --help' for a command's options. Settings of 'serve' are LOOKALIKE_*
environment variables (README: Configuration reference)."""

_COMMAND_MODULES = ("training.cli", "index.cli", "service.cli")


def build_parser() -> argparse.ArgumentParser:
    from lookalike import __version__

    parser = argparse.ArgumentParser(prog="lookalike", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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


#: LOOKALIKE_* variables read outside the service settings (service/settings.py has the rest):
#: the command's log level, the converted-weights cache, and the test, CI and container tooling.
OTHER_ENV = ("LOG", "CACHE_DIR", "ARTIFACTS", "CUB100", "CHROMIUM", "CTR_DIR", "REBUILD_BASE", "SMOKE_IMAGE",
             "UID", "GID", "PUBLISH_PORT", "MODEL", "INDEX")


def known_env() -> set[str]:
    """Every LOOKALIKE_* environment variable lookalike reads."""
    from service.settings import Settings

    return {f"LOOKALIKE_{name.upper()}" for name in Settings.model_fields} | {f"LOOKALIKE_{n}" for n in OTHER_ENV}


def unknown_env_warnings(environ: dict[str, str] | None = None) -> list[str]:
    """One warning per LOOKALIKE_* variable nobody reads (a typo is otherwise silently ignored),
    naming the closest known one."""
    import difflib

    env = os.environ if environ is None else environ
    known = known_env()
    out = []
    for name in sorted(n for n in env if n.startswith("LOOKALIKE_") and n not in known):
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else " (README: Configuration reference lists them)"
        out.append(f"unknown environment variable {name} is ignored{hint}")
    return out


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
    for warning in unknown_env_warnings():
        logging.getLogger("lookalike").warning("%s", warning)
    try:
        # training calls this once its config is valid: a config error must not wait for torch
        args.wire_feedback = wire_feedback
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
