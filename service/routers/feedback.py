"""``/v1/feedback``: users mark search results right or wrong (API key), and list the marks.

* ``POST /v1/feedback`` (multipart or url-encoded form): ``verdict`` (``wrong`` | ``right``),
  ``result_id``, and the query: ``query_id`` (an indexed image, as in ``/v1/images/{id}/similar``)
  or ``file`` (the uploaded query image, validated exactly like a ``POST /v1/search`` upload);
* ``GET /v1/feedback?limit=&offset=``: every mark, oldest first.

Both need ``Authorization: Bearer <LOOKALIKE_API_KEY>`` (401 / 403) and a writable service
(403 ``writes_disabled``), like ``POST /v1/images``. Marks are stored by :mod:`index.feedback`
in the index's metadata database, durable before the 201; ``lookalike train --feedback INDEX``
reads them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from index.feedback import VERDICTS, add_feedback, list_feedback
from service.deps import WriterDep
from service.errors import ApiError
from service.routers.common import errors
from service.state import ServiceState
from service.uploads import decode_to_input, read_upload

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["feedback"])

#: Most marks one ``GET /v1/feedback`` returns.
MAX_LIST = 1000


class FeedbackCreated(BaseModel):
    id: int = Field(description="id of the stored mark")
    verdict: str = Field(description="'wrong' or 'right'")
    query_id: int | None = Field(description="the indexed query image; null when the query was uploaded")
    result_id: int = Field(description="the marked result image")


class FeedbackItem(BaseModel):
    id: int
    created: float = Field(description="unix time the mark was stored")
    verdict: str = Field(description="'wrong' or 'right'")
    query_id: int | None = Field(description="the indexed query image; null when the query was uploaded")
    query_label: str | None = Field(description="label of the indexed query image at marking time")
    query_sha256: str = Field(description="sha256 of the query image")
    result_id: int
    result_path: str = Field(description="path of the result image relative to its root, at marking time")
    result_label: str | None = Field(description="label of the result image at marking time")


class FeedbackList(BaseModel):
    items: list[FeedbackItem] = Field(description="marks, oldest first")
    total: int = Field(description="marks stored in all")
    limit: int
    offset: int


_FORM_FIELDS = {
    "verdict": {"type": "string", "enum": list(VERDICTS), "description": "is the result a right or a wrong match?"},
    "result_id": {"type": "integer", "minimum": 0, "description": "id of the result being marked"},
    "query_id": {"type": "integer", "minimum": 0, "description": "the query, when it was an indexed image"},
    "file": {"type": "string", "format": "binary",
             "description": "the query, when it was an uploaded image (JPEG, PNG, WebP or GIF)"},
}
_OPENAPI = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["verdict", "result_id"],
                                       "properties": _FORM_FIELDS}}}}}


def _parse_id(name: str, raw: str | None) -> int | None:
    """An image id form field: None when absent or empty, else an integer >= 0 (422 otherwise)."""
    if raw is None or not raw.strip():
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, "invalid_parameter", f"{name}: must be an integer, got {raw[:32]!r}") from None
    if not 0 <= value <= 2**63 - 1:
        raise ApiError(422, "invalid_parameter", f"{name}: must be an image id (>= 0), got {value}")
    return value


async def _validate_image(state: ServiceState, data: bytes) -> None:
    """Decode and preprocess the query upload exactly as ``POST /v1/search`` does (safe decode,
    the same limits); an image search would refuse is refused here with the same 400/413/415."""
    with state.admit():  # decoding costs CPU: bounded like a search, 503 when overloaded
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(state.decode_pool, decode_to_input, data, state.backend.preprocess,
                                   state.limits, state.settings.jpeg_draft)


@router.post("/feedback", response_model=FeedbackCreated, status_code=201,
             summary="Mark a search result right or wrong (API key)", openapi_extra=_OPENAPI,
             responses=errors(400, 401, 403, 404, 413, 415, 422, 503))
async def post_feedback(request: Request, state: WriterDep) -> FeedbackCreated:
    """Record that, for a query, a result is a ``wrong`` or a ``right`` match. The query is
    ``query_id`` (an indexed image) or ``file`` (the uploaded image, stored with the mark).
    A 201 means the mark is durable; 404 names an id that is not indexed."""
    upload = await read_upload(request, state.settings.max_upload_bytes, file_required=False,
                               what="the feedback as multipart/form-data (verdict, result_id, and query_id or file)")
    fields, data = upload.fields, upload.data
    verdict = (fields.get("verdict") or "").strip()
    if verdict not in VERDICTS:
        raise ApiError(422, "invalid_parameter", f"verdict: must be one of {list(VERDICTS)}, got {verdict[:32]!r}")
    result_id = _parse_id("result_id", fields.get("result_id"))
    if result_id is None:
        raise ApiError(422, "invalid_parameter", "result_id: the id of the marked result is required")
    query_id = _parse_id("query_id", fields.get("query_id"))
    if (query_id is None) == (data is None):
        raise ApiError(422, "invalid_parameter",
                       "give the query as exactly one of query_id (an indexed image) and file (an uploaded image)")
    if data is not None:
        await _validate_image(state, data)

    def write(store) -> int:
        return add_feedback(store, verdict=verdict, result_id=result_id, query_id=query_id, query_bytes=data)

    try:  # the single writer thread, ordered with adds and deletes, under the same disk guard (507)
        mark_id = await state.write(write)
    except KeyError as exc:
        raise ApiError(404, "not_found", str(exc.args[0]) if exc.args else "no such image") from None
    except ValueError as exc:
        raise ApiError(422, "invalid_parameter", str(exc)) from None
    return FeedbackCreated(id=mark_id, verdict=verdict, query_id=query_id, result_id=result_id)


@router.get("/feedback", response_model=FeedbackList, summary="List the marks (API key)",
            responses=errors(401, 403, 422, 503))
async def get_feedback(state: WriterDep,
                       limit: Annotated[int, Query(ge=0, le=MAX_LIST, description="marks wanted")] = 100,
                       offset: Annotated[int, Query(ge=0, description="skip this many marks")] = 0,
                       ) -> FeedbackList:
    """Every stored mark, oldest first, ``offset .. offset+limit-1``; ``total`` counts them all."""

    def read():
        with state.store.db.snapshot() as con:
            return list_feedback(con, limit=limit, offset=offset)

    total, rows = await state.read(read)
    items = [FeedbackItem(id=r.id, created=r.created, verdict=r.verdict, query_id=r.query_id,
                          query_label=r.query_label, query_sha256=r.query_sha256, result_id=r.result_id,
                          result_path=r.result_path, result_label=r.result_label) for r in rows]
    return FeedbackList(items=items, total=total, limit=limit, offset=offset)
