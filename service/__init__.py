"""lookalike.service: the REST API and search page over a model and an index (and more named
collections, each an index with its model).

``create_app(settings=None) -> FastAPI``; ``Settings`` (env prefix ``LOOKALIKE_``);
``lookalike serve`` runs it with uvicorn.

Names are loaded on first use: the ``lookalike`` command registers ``serve`` for every
subcommand, and importing FastAPI here cost one-shot commands (``lookalike index search``)
~2 s of start-up (python -X importtime).
"""

import os

# numpy's OpenBLAS workers spin ~0.1 s of CPU after each multi-threaded call by default (measured:
# 105 ms of CPU in the 200 ms after one 2-thread product), taking a core from the requests behind
# a lone query's two-core search (index.ann.lone_exact_search). Set before models imports numpy;
# `python -m service` and `lookalike serve` import this package first.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from models.lazy import lazy_getattr  # noqa: E402

_LAZY = {"create_app": "service.app", "Settings": "service.settings", "CollectionConfig": "service.settings"}
__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = ["CollectionConfig", "Settings", "create_app"]
