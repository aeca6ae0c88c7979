"""lookalike.service: the REST API and search page over a model and an index (and more named
collections, each an index with its model).

``create_app(settings=None) -> FastAPI``; ``Settings`` (env prefix ``LOOKALIKE_``);
``lookalike serve`` runs it with uvicorn.

Names are loaded on first use: the ``lookalike`` command registers ``serve`` for every
subcommand, and importing FastAPI here cost one-shot commands (``lookalike index search``)
~2 s of start-up (python -X importtime).
"""

from models.lazy import lazy_getattr

_LAZY = {"create_app": "service.app", "Settings": "service.settings", "CollectionConfig": "service.settings"}
__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = ["CollectionConfig", "Settings", "create_app"]
