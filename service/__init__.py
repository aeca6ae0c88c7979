"""lookalike.service: the REST API and search page over a model and an index (and more named
collections, each an index with its model).

``create_app(settings=None) -> FastAPI``; ``Settings`` (env prefix ``LOOKALIKE_``);
``lookalike serve`` runs it with uvicorn.
"""

from service.app import create_app
from service.settings import CollectionConfig, Settings

__all__ = ["CollectionConfig", "Settings", "create_app"]
