"""lookalike.service: the REST API and search page over a model and an index.

``create_app(settings=None) -> FastAPI``; ``Settings`` (env prefix ``LOOKALIKE_``);
``lookalike serve`` runs it with uvicorn.
"""

from service.app import create_app
from service.settings import Settings

__all__ = ["Settings", "create_app"]
