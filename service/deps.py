"""FastAPI dependencies: the collection's state, readiness, and the API key for writes."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Path, Request

from service.errors import ApiError
from service.state import ServiceState


def get_state(request: Request) -> ServiceState:
    """The collection the request addresses: ``{collection}`` in its path, else the default
    (404 ``collection_not_found`` for a name the server does not have)."""
    return request.app.state.collections.get(request.path_params.get("collection"))


def _collection_param(collection: Annotated[str, Path(
        max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="collection name (`default` is LOOKALIKE_INDEX_DIR)")]) -> None:
    """Declares ``{collection}`` for the OpenAPI document; :func:`get_state` resolves it."""


#: Added to the routes included under ``/v1/collections/{collection}``.
CollectionPath = Depends(_collection_param)


StateDep = Annotated[ServiceState, Depends(get_state)]


def ready_state(state: StateDep) -> ServiceState:
    """The state, or 503 with Retry-After while the model and index are not loaded and verified."""
    state.require_ready()
    return state


ReadyDep = Annotated[ServiceState, Depends(ready_state)]


def require_api_key(request: Request, state: StateDep) -> ServiceState:
    """Writes need ``Authorization: Bearer <key>``: 401 when missing, 403 when wrong (constant-time compare).

    Checked before readiness, so a client without the key learns that first.
    """
    if not state.settings.writes_enabled or state.settings.api_key is None:
        raise ApiError(403, "writes_disabled", "this service is read-only")
    header = request.headers.get("authorization")
    scheme, _, token = (header or "").partition(" ")
    if not header or scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "an API key is required: send 'Authorization: Bearer <key>'",
                       headers={"WWW-Authenticate": "Bearer"})
    expected = state.settings.api_key.get_secret_value().encode()
    if not hmac.compare_digest(token.strip().encode(), expected):
        raise ApiError(403, "forbidden", "the API key is not valid")
    state.require_ready()
    return state


WriterDep = Annotated[ServiceState, Depends(require_api_key)]
