"""Running the service under uvicorn (used by ``lookalike serve`` and ``python -m service``)."""

from __future__ import annotations

import json
import logging
import os
import sys

from service.settings import Settings

log = logging.getLogger(__name__)


def load_settings(**overrides) -> Settings:
    """Settings from ``LOOKALIKE_*`` plus ``overrides``; ValueError/FileNotFoundError on bad values."""
    from pydantic import ValidationError

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
    for cname, c in settings.collections.items():
        for what, value in (("index", c.index_dir), ("model", c.model_dir)):
            if value is not None and not value.is_dir():
                raise FileNotFoundError(f"{value}: {what} directory of collection {cname!r} not found")
    return settings


def torch_imported_here() -> bool:
    """True when torch is already imported in this process (so not by the inference thread)."""
    return "torch" in sys.modules


def reexec_clean(overrides: dict) -> None:
    """Replace this process by ``python -m service`` with ``overrides`` as ``LOOKALIKE_*`` variables.

    Why: a torch forward run in a thread other than the one that imported torch is slower
    (docs/design.md, "Service: one inference thread that also imports torch"). The
    ``lookalike`` dispatcher imports every package's CLI, and some of
    them import torch, so ``lookalike serve`` starts the server in a fresh interpreter whose
    main thread never imports torch.
    """
    env = dict(os.environ)
    for key, value in overrides.items():  # dicts (collections) as the JSON the settings parse
        env[f"LOOKALIKE_{key.upper()}"] = json.dumps(value, default=str) if isinstance(value, dict) else str(value)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "service"], env)


def http_protocol(settings: Settings, refusal=None):
    """uvicorn ``http=`` value: the guarded httptools protocol (header timeout and limits, JSON
    503 at the connection limit, and the 503 from the headers when ``refusal(method, path)``
    says so: the app's ``state.overload_refusal``), or uvicorn's h11 with its header-size limit
    if httptools is missing (then the connection limit is uvicorn's own, plain-text, and an
    overloaded service refuses inference requests once their body is in)."""
    try:
        from service.protocol import HttpLimits, guarded_protocol
    except ImportError:  # pragma: no cover - uvicorn[standard] brings httptools
        log.warning("httptools is not installed: no header timeout or count limit, plain-text 503 at the "
                    "connection limit (install uvicorn[standard])")
        return "h11"
    return guarded_protocol(HttpLimits(
        header_timeout_s=settings.header_timeout_s, max_header_count=settings.max_header_count,
        max_header_bytes=settings.max_header_bytes, limit_concurrency=settings.limit_concurrency,
        retry_after_s=settings.retry_after_s, refusal=refusal,
    ))


def run(settings: Settings) -> int:
    """Serve ``settings`` with uvicorn until stopped. RuntimeError if the app failed to start.

    Returns 0 after a clean stop (SIGTERM or SIGINT included) once the shutdown checkpoint has
    run, 1 if it failed. On SIGTERM, requests in progress get ``graceful_shutdown_s`` to finish,
    then they are cancelled and their connections closed; the checkpoint runs after either way.
    """
    import signal

    import uvicorn

    from service.app import create_app

    app = create_app(settings)
    http = http_protocol(settings, app.state.overload_refusal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,  # one process: one model copy, one index writer
        access_log=settings.access_log,
        http=http,
        # the guarded protocol applies the limit itself (to requests, with the JSON 503)
        limit_concurrency=settings.limit_concurrency if isinstance(http, str) else None,
        timeout_keep_alive=settings.timeout_keep_alive,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        log_config=None,  # keep the caller's logging setup
        lifespan="on",
        server_header=False,
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it is done; a handler of ours receives it
    # instead of the default action (death by SIGTERM, status 143), so a clean stop exits 0.
    stop_signals: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop_signals.append(signum))
    try:
        server.run()
    except SystemExit:  # uvicorn exits with status 3 when the lifespan fails
        if getattr(server, "started", False):
            raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not getattr(server, "started", False):
        reason = app.state.collections.error or "see the log above"
        raise RuntimeError(f"the service did not start: {reason}")
    shutdown_error = app.state.collections.shutdown_error
    if shutdown_error:
        log.error("stopped, but the shutdown checkpoint failed: %s", shutdown_error)
        return 1
    log.info("stopped cleanly%s", " (SIGTERM)" if stop_signals else "")
    return 0
