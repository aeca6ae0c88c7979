"""``lookalike serve``: run the service with uvicorn. Import-light (heavy imports in the handler)."""

from __future__ import annotations

import argparse
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the search API and page over a model and an index",
        description="Serve the REST API (/v1/search, /v1/images, /v1/index, /v1/collections, /healthz, /readyz, "
        "/metrics, /docs) and the search page (/). Every setting is also read from LOOKALIKE_<NAME> environment variables "
        "(e.g. LOOKALIKE_API_KEY); flags given here override them.",
        epilog="examples:\n"
        "  export LOOKALIKE_API_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe(24))')\n"
        "  lookalike serve --model runs/demo --index runs/demo/index            writes need the key (16+ characters)\n"
        "  lookalike serve --model models/lite0 --index my-index --read-only    no key, no writes\n"
        "  LOOKALIKE_IMAGES_ROOT=/mnt/photos lookalike serve ...               images moved since indexing",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", dest="model_dir", help="model or training-run directory (LOOKALIKE_MODEL_DIR)")
    p.add_argument("--index", dest="index_dir", help="index directory (LOOKALIKE_INDEX_DIR): the default collection")
    p.add_argument("--collection", dest="collections", action="append", metavar="NAME=INDEX_DIR",
                   help="also serve this index as collection NAME under /v1/collections/NAME/... with the same "
                   "model; repeat for more (replaces LOOKALIKE_COLLECTIONS, whose JSON form can give each its "
                   "own model_dir)")
    p.add_argument("--host", help="bind address (LOOKALIKE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (LOOKALIKE_PORT, default 8000)")
    p.add_argument("--backend", choices=["auto", "torch", "onnx", "openvino"], help="inference backend (LOOKALIKE_BACKEND)")
    p.add_argument("--read-only", action="store_true",
                   help="disable POST/DELETE /v1/images (LOOKALIKE_WRITES_ENABLED=false); no API key needed")
    p.add_argument("--max-batch", type=int, help="queries per forward pass, 1 = no micro-batching")
    p.add_argument("--batch-wait-ms", type=float, help="longest wait to fill a batch")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--no-reexec", action="store_true",
                   help="serve in this process even if torch was already imported here (slower torch forward)")
    p.set_defaults(func=_serve)


def _parse_collections(values: list[str]) -> dict[str, str]:
    """``["birds=idx/b", ...]`` -> ``{"birds": "idx/b"}`` (names are checked by the settings)."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, index_dir = v.partition("=")
        if not sep or not name or not index_dir:
            raise ValueError(f"--collection {v!r}: write NAME=INDEX_DIR, e.g. --collection cars=runs/cars/index")
        if name in out:
            raise ValueError(f"--collection {name!r} is given twice")
        out[name] = index_dir
    return out
def check_model_matches_index(model_dir, index_dir) -> None:
    """Refuse, in one line naming both models, an index built with another model (before the
    server starts, so the user sees no start-up traceback). Other problems are left to the server."""
    import json
    from pathlib import Path

    from index.errors import ModelMismatchError
    from index.store import STORE_FILE
    from models.io import load_card

    if model_dir is None or index_dir is None or not (Path(index_dir) / STORE_FILE).is_file():
        return
    try:
        built = json.loads((Path(index_dir) / STORE_FILE).read_text())
        card = load_card(model_dir, verify=False)
    except (OSError, ValueError):
        return
    if built.get("fingerprint") and card.fingerprint and built["fingerprint"] != card.fingerprint:
        raise ModelMismatchError(
            f"{index_dir} was built with the model {built.get('model_dir') or '(path not recorded)'} "
            f"(fingerprint {built['fingerprint'][:12]}), not with {Path(model_dir).resolve()} (fingerprint "
            f"{card.fingerprint[:12]}): serve it with that model, or build a new index with this one")


def _serve(args: argparse.Namespace) -> int:
    from service.server import load_settings, reexec_clean, run, torch_imported_here

    overrides = {
        name: getattr(args, name)
        for name in ("model_dir", "index_dir", "host", "port", "backend", "max_batch", "batch_wait_ms")
        if getattr(args, name) is not None
    }
    if args.collections:
        overrides["collections"] = _parse_collections(args.collections)
    if args.read_only:
        overrides["writes_enabled"] = False
    if args.access_log:
        overrides["access_log"] = True
    settings = load_settings(**overrides)  # bad settings are reported here, before any exec
    check_model_matches_index(settings.model_dir, settings.index_dir)
    if torch_imported_here() and not args.no_reexec:
        if getattr(args, "verbose", False):
            os.environ["LOOKALIKE_LOG"] = "DEBUG"
        reexec_clean(overrides)  # does not return
    return run(settings)
