"""``lookalike serve``: run the service with uvicorn. Import-light (heavy imports in the handler)."""

from __future__ import annotations

import argparse


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
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], help="inference backend (LOOKALIKE_BACKEND)")
    p.add_argument("--read-only", action="store_true",
                   help="disable POST/DELETE /v1/images (LOOKALIKE_WRITES_ENABLED=false); no API key needed")
    p.add_argument("--max-batch", type=int, help="queries per forward pass, 1 = no micro-batching")
    p.add_argument("--batch-wait-ms", type=float, help="longest wait to fill a batch")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from service.app import create_app
    from service.settings import Settings

    overrides = {
        name: getattr(args, name)
        for name in ("model_dir", "index_dir", "host", "port", "backend", "max_batch", "batch_wait_ms")
        if getattr(args, name) is not None
    }
    if args.read_only:
        overrides["writes_enabled"] = False
    if args.access_log:
        overrides["access_log"] = True
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid settings: {msgs}") from None
    for name, value in (("model", settings.model_dir), ("index", settings.index_dir)):
        if value is None:
            raise ValueError(f"no {name} directory: pass --{name} or set LOOKALIKE_{name.upper()}_DIR")
        if not value.is_dir():
            raise FileNotFoundError(f"{value}: {name} directory not found")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,  # one process: one model copy, one index writer
        access_log=settings.access_log,
        limit_concurrency=settings.limit_concurrency,
        timeout_keep_alive=settings.timeout_keep_alive,
        log_config=None,  # keep the lookalike CLI's logging setup
        lifespan="on",
        server_header=False,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn exits with status 3 when the lifespan fails
        if getattr(server, "started", False):
            raise
    if not getattr(server, "started", False):
        reason = app.state.lookalike.error or "see the log above"
        raise RuntimeError(f"the service did not start: {reason}")
    return 0
