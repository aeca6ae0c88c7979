"""``/v1/search``: the most similar indexed images to uploaded ones.

* ``POST /v1/search``: one image;
* ``POST /v1/search/batch``: several images, one result list (or one error) per image;
* ``POST /v1/search/mean``: "more like these": the mean of several images' unit vectors
  (uploads and/or indexed ids), renormalised, searched as one query.

Every route takes ``k``, ``offset`` (pagination, ``offset + k <= max_k``), ``label`` and
``exclude_label`` (filters applied inside the index, so k hits come back whenever k match).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect

from models.decode import ImageDecodeError
from service.deps import ReadyDep
from service.errors import ApiError, from_decode_error
from service.batching import Ticket
from service.routers.common import SearchWindow, admits_queries, errors, hit_list, parse_window, search_response
from service.schemas import BatchSearchResponse, SearchResponse
from service.state import ServiceState
from service.uploads import MAX_FIELD_BYTES, read_upload, upload_openapi

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["search"])

#: Most images in one batch or mean query. Each is admitted as one query (``max_pending``), and
#: the whole request body must still fit the upload limit (``LOOKALIKE_MAX_UPLOAD_BYTES``).
MAX_BATCH_IMAGES = 32
#: Below this norm the mean of the unit vectors has no direction (the images cancel out).
MIN_MEAN_NORM = 1e-6

_WINDOW_FIELDS = (
    ("k", {"type": "integer", "minimum": 1, "description": "hits wanted (1..max_k)"}),
    ("offset", {"type": "integer", "minimum": 0, "default": 0,
                "description": "skip this many best hits (pagination); offset + k <= max_k"}),
    ("label", {"type": "string", "maxLength": 200, "description": "only images with exactly this label"}),
    ("exclude_label", {"type": "string", "maxLength": 200,
                       "description": "no image with exactly this label (unlabelled images stay)"}),
)


def _multi_upload_openapi(*extra: tuple[str, dict], files_required: bool = True) -> dict:
    """OpenAPI ``requestBody``: multipart with one or more ``file`` parts plus fields."""
    props = {"file": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": f"the images (JPEG, PNG, WebP or GIF), 1..{MAX_BATCH_IMAGES} parts named 'file'"}}
    props.update(dict(_WINDOW_FIELDS))
    props.update(dict(extra))
    schema = {"type": "object", "properties": props, **({"required": ["file"]} if files_required else {})}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


@dataclass
class _Part:
    """One ``file`` part: its bytes, or why it was refused before decoding (too large)."""

    filename: str | None
    data: bytes | None
    error: ApiError | None = None


async def _read_parts(request: Request, max_upload_bytes: int) -> tuple[list[_Part], list[tuple[str, str]]]:
    """Parse ``multipart/form-data`` with up to :data:`MAX_BATCH_IMAGES` ``file`` parts (or a
    url-encoded form, which has fields only: an ids-only mean query).

    Returns (file parts in order, other fields as (name, value) pairs). A file over the upload
    limit becomes a part carrying a 413 error, so a batch answers for it alone.

    Raises:
        ApiError: 415 not a form, 400 malformed multipart, 422 too many files.
    """
    ctype = request.headers.get("content-type", "").lower()
    if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise ApiError(415, "unsupported_media_type", "send the images as multipart/form-data with 'file' fields")
    try:
        form = await request.form(max_files=MAX_BATCH_IMAGES, max_fields=MAX_BATCH_IMAGES + 16,
                                  max_part_size=MAX_FIELD_BYTES)
    except (MultiPartException, HTTPException) as exc:
        message = getattr(exc, "message", None) or getattr(exc, "detail", "")
        if isinstance(exc, HTTPException) and exc.status_code != 400:
            raise
        if "Too many files" in str(message):
            raise ApiError(422, "invalid_parameter",
                           f"file: at most {MAX_BATCH_IMAGES} images per request") from None
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {message}") from None
    except ClientDisconnect:
        raise ApiError(400, "bad_request", "client disconnected while sending the body") from None
    parts: list[_Part] = []
    fields: list[tuple[str, str]] = []
    try:
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields.append((key, value))
            elif key == "file" and isinstance(value, UploadFile):
                data = await value.read(max_upload_bytes + 1)
                if len(data) > max_upload_bytes:
                    parts.append(_Part(value.filename, None, ApiError(
                        413, "too_large", f"image is over the limit of {max_upload_bytes} bytes")))
                else:
                    parts.append(_Part(value.filename, data))
    finally:
        await form.close()
    return parts, fields


def _window(state: ServiceState, fields: dict[str, str]) -> SearchWindow:
    return parse_window(state.settings, fields.get("k"), fields.get("offset"), fields.get("label"),
                        fields.get("exclude_label"))


def _as_api_error(exc: BaseException) -> ApiError:
    """The error one image of a batch answers with (unexpected ones are logged, and say only 'internal')."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ImageDecodeError):
        return from_decode_error(exc)
    log.error("batch image failed", exc_info=exc)
    return ApiError(500, "internal", "internal server error")


async def _embed_parts(state: ServiceState, first: Ticket, parts: list[_Part]) -> list[np.ndarray | ApiError]:
    """Embed every part concurrently (the micro-batcher takes them into shared forward passes).

    One admitted query per image: ``first`` was admitted by the caller (the request passed the
    queue-wait check then), the rest are admitted here by count only; if the service cannot
    admit them all, the whole request gets 503 (nothing half-done).

    Returns, per part, its (D,) float32 unit vector or its error.
    """
    todo = [p for p in parts if p.error is None]
    with contextlib.ExitStack() as tickets:
        admitted = [first] + [tickets.enter_context(state.admit(same_request=True)) for _ in todo[1:]]
        done = await asyncio.gather(*(state.embed_upload(t, p.data) for t, p in zip(admitted, todo)),
                                    return_exceptions=True)
    by_part = dict(zip(map(id, todo), done))
    out: list[np.ndarray | ApiError] = []
    for p in parts:
        r = p.error if p.error is not None else by_part[id(p)]
        out.append(_as_api_error(r) if isinstance(r, BaseException) else r)
    return out


async def _search_vectors(state: ServiceState, vectors: np.ndarray, w: SearchWindow,
                          exclude_ids: tuple[int, ...] = ()) -> list[list]:
    """Search (Q, D) float32 unit ``vectors`` in the search thread -> Q hit lists for window ``w``."""
    return await state.search_thread(
        lambda: state.store.search(vectors, w.k, exclude_ids=exclude_ids, **w.search_kwargs()))


@router.post(
    "/search",
    response_model=SearchResponse,
    summary="Search by an uploaded image",
    openapi_extra=upload_openapi(*_WINDOW_FIELDS),
    responses=errors(400, 413, 415, 422, 503),
)
@admits_queries
async def search(request: Request, state: ReadyDep) -> JSONResponse:
    """Upload an image (multipart field ``file``) and get the top ``k`` indexed images ranked by
    cosine similarity. The format is decided by the content (JPEG, PNG, WebP, GIF).

    ``offset`` pages through the ranking (ranks ``offset .. offset+k-1``, up to ``max_k`` deep);
    ``label`` / ``exclude_label`` filter by label and still return ``k`` hits when ``k`` match."""
    t0 = time.perf_counter()
    with state.admit() as ticket:
        upload = await read_upload(request, state.settings.max_upload_bytes)
        w = _window(state, upload.fields)
        if w.filtered:
            vector = await state.embed_upload(ticket, upload.data)
            (hits,) = await _search_vectors(state, vector[None, :], w)
        else:  # the micro-batched embed + search path
            hits = (await state.search_upload(ticket, upload.data, w.offset + w.k))[w.offset:]
    return search_response(request, state, hits, w.k, t0, w.offset)


@router.post(
    "/search/batch",
    response_model=BatchSearchResponse,
    summary="Search by several uploaded images at once",
    openapi_extra=_multi_upload_openapi(),
    responses=errors(400, 413, 415, 422, 503),
)
@admits_queries
async def search_batch(request: Request, state: ReadyDep) -> JSONResponse:
    """Upload up to 32 images (several multipart parts named ``file``) and get one result list per
    image, in the order sent; each equals what ``POST /v1/search`` answers for that image alone.

    An image that cannot be used (undecodable, too large, wrong format) gets its own ``error``
    and ``status`` in its item; the others are still answered (200). The parameters (``k``,
    ``offset``, ``label``, ``exclude_label``) apply to every image. The whole body must fit the
    upload limit (413 otherwise)."""
    t0 = time.perf_counter()
    with state.admit() as first:
        parts, fields = await _read_parts(request, state.settings.max_upload_bytes)
        w = _window(state, dict(fields))
        if not parts:
            raise ApiError(422, "invalid_parameter", "file: at least one image part named 'file' is required")
        embedded = await _embed_parts(state, first, parts)
        ok = [i for i, e in enumerate(embedded) if not isinstance(e, ApiError)]
        hits = await _search_vectors(state, np.stack([embedded[i] for i in ok]), w) if ok else []
    found = dict(zip(ok, hits))
    items = []
    for i, (part, e) in enumerate(zip(parts, embedded)):
        if isinstance(e, ApiError):
            items.append({"filename": part.filename, "status": e.status,
                          "error": {"code": e.code, "message": e.message}})
        else:
            items.append({"filename": part.filename, "status": 200, "results": hit_list(request, found[i])})
    return JSONResponse({"items": items, "k": w.k, "offset": w.offset, "model": state.fingerprint,
                         "index": state.store.generation,
                         "took_ms": round((time.perf_counter() - t0) * 1000.0, 3)})


def _parse_ids(values: list[str]) -> tuple[int, ...]:
    ids = []
    for v in values:
        try:
            i = int(v)
        except ValueError:
            raise ApiError(422, "invalid_parameter", f"id: must be an integer image id, got {v[:32]!r}") from None
        if not 0 <= i < 2**63:
            raise ApiError(422, "invalid_parameter", f"id: must be a non-negative int64, got {i}")
        ids.append(i)
    return tuple(dict.fromkeys(ids))


@router.post(
    "/search/mean",
    response_model=SearchResponse,
    summary="More like these: search by the mean of several images",
    openapi_extra=_multi_upload_openapi(
        ("id", {"type": "array", "items": {"type": "integer", "minimum": 0},
                "description": "indexed image ids to include (excluded from the results)"}),
        files_required=False),
    responses=errors(400, 404, 413, 415, 422, 503),
)
@admits_queries
async def search_mean(request: Request, state: ReadyDep) -> JSONResponse:
    """"More like these": the query is the mean of the images' unit vectors, renormalised.

    Give uploaded images (parts named ``file``) and/or indexed images (fields named ``id``), up
    to 32 in all. Indexed images given are left out of the results. Any image that cannot be
    used fails the whole request with its status (the message names which one); an unknown id
    is 404."""
    t0 = time.perf_counter()
    with state.admit() as first:
        parts, fields = await _read_parts(request, state.settings.max_upload_bytes)
        w = _window(state, dict(fields))
        ids = _parse_ids([v for name, v in fields if name == "id"])
        if not parts and not ids:
            raise ApiError(422, "invalid_parameter", "give at least one image: a 'file' part or an 'id' field")
        if len(parts) + len(ids) > MAX_BATCH_IMAGES:
            raise ApiError(422, "invalid_parameter", f"at most {MAX_BATCH_IMAGES} images (files and ids together)")
        vectors = []
        for i, (part, e) in enumerate(zip(parts, await _embed_parts(state, first, parts))):
            if isinstance(e, ApiError):
                name = f" ({part.filename})" if part.filename else ""
                raise ApiError(e.status, e.code, f"file {i + 1}{name}: {e.message}", e.headers)
            vectors.append(e)
        for i in ids:
            v = await state.read(state.store.vector, i)
            if v is None:
                raise ApiError(404, "not_found", f"no image with id {i}")
            vectors.append(v)
        mean = np.mean(np.stack(vectors).astype(np.float32), axis=0)
        norm = float(np.linalg.norm(mean))
        if norm < MIN_MEAN_NORM:
            raise ApiError(422, "invalid_parameter", "the images' vectors cancel out: their mean has no direction")
        (hits,) = await _search_vectors(state, (mean / norm)[None, :].astype(np.float32), w, exclude_ids=ids)
    return search_response(request, state, hits, w.k, t0, w.offset)
