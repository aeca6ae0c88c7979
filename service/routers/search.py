"""``POST /v1/search``: the most similar indexed images to an uploaded one."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.deps import ReadyDep
from service.routers.common import errors, search_response
from service.schemas import SearchResponse
from service.uploads import parse_k, read_upload, upload_openapi

router = APIRouter(prefix="/v1", tags=["search"])


@router.post(
    "/search",
    response_model=SearchResponse,
    summary="Search by an uploaded image",
    openapi_extra=upload_openapi(("k", {"type": "integer", "minimum": 1, "description": "hits wanted (1..max_k)"})),
    responses=errors(400, 413, 415, 422, 503),
)
async def search(request: Request, state: ReadyDep) -> JSONResponse:
    """Upload an image (multipart field ``file``) and get the top ``k`` indexed images ranked by
    cosine similarity. The format is decided by the content (JPEG, PNG, WebP, GIF)."""
    t0 = time.perf_counter()
    s = state.settings
    with state.admit() as ticket:
        upload = await read_upload(request, s.max_upload_bytes)
        k = parse_k(upload.fields.get("k"), s.default_k, s.max_k)
        hits = await state.search_upload(ticket, upload.data, k)
    return search_response(request, state, hits, k, t0)
