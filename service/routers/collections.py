"""``/v1/collections``: which collections this server has, and the state of each.

A collection's own resources (search, images, index, feedback) are the single-index routes
under ``/v1/collections/{collection}/...`` (see :mod:`service.app`).
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.deps import CollectionPath, StateDep
from service.routers.common import collection_status, errors
from service.schemas import CollectionList, CollectionStatus

router = APIRouter(prefix="/v1/collections", tags=["collections"])


@router.get("", response_model=CollectionList, summary="The collections served and their state")
async def list_collections(request: Request) -> CollectionList:
    states = request.app.state.collections.states.values()
    return CollectionList(collections=[collection_status(s) for s in states])


@router.get("/{collection}", response_model=CollectionStatus, summary="One collection's state",
            dependencies=[CollectionPath], responses=errors(404))
async def get_collection(state: StateDep) -> CollectionStatus:
    """The collection's state (200 also while it loads: see ``status``); 404 if there is none."""
    return collection_status(state)
