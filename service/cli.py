"""``lookalike serve``: run the service with uvicorn. Import-light (heavy imports in the handler)."""

from __future__ import annotations

import argparse
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the search API and page over a model and an index",
        description="Serve the REST API (/v1/search, /v1/images, /v1/index, /healthz, /readyz, /metrics, /docs) "
        "and the search page (/). Every setting is also read from LOOKALIKE_<NAME> environment variables "
        "(e.g. LOOKALIKE_API_KEY); flags given here override them.",
    )
    p.add_argument("--model", dest="model_dir", help="model or training-run directory (LOOKALIKE_MODEL_DIR)")
    p.add_argument("--index", dest="index_dir", help="index directory (LOOKALIKE_INDEX_DIR)")
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


def _serve(args: argparse.Namespace) -> int:
    from service.server import load_settings, reexec_clean, run, torch_imported_here

    overrides = {
        name: getattr(args, name)
        for name in ("model_dir", "index_dir", "host", "port", "backend", "max_batch", "batch_wait_ms")
        if getattr(args, name) is not None
    }
    if args.read_only:
        overrides["writes_enabled"] = False
    if args.access_log:
        overrides["access_log"] = True
    settings = load_settings(**overrides)  # bad settings are reported here, before any exec
    if torch_imported_here() and not args.no_reexec:
        if getattr(args, "verbose", False):
            os.environ["LOOKALIKE_LOG"] = "DEBUG"
        reexec_clean(overrides)  # does not return
    return run(settings)
