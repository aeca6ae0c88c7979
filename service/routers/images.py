"""``/v1/images``: fetch an indexed image, search by it, add and delete images (API key)."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from models.decode import image_ext, image_media_type
from service.deps import ReadyDep, WriterDep
from service.errors import ApiError
from service.routers.common import admits_queries, errors, image_url, parse_window, search_response
from service.schemas import AddImageResponse, DeleteResponse, ImageOut, SearchResponse
from service.uploads import parse_label, read_upload, upload_openapi

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/images", tags=["images"])

ImageId = Annotated[int, Path(ge=0, le=2**63 - 1, description="image id")]


def _not_found(image_id: int) -> ApiError:
    return ApiError(404, "not_found", f"no image with id {image_id}")


def _image_out(request: Request, rec) -> ImageOut:
    return ImageOut(id=rec.id, path=rec.path, label=rec.label, sha256=rec.sha256, size=rec.size,
                    source=rec.source, added_at=rec.added_at, image_url=image_url(request, rec.id))


#: Largest indexed file served (the batch job's default decode limit is 10 MiB).
MAX_SERVED_BYTES = 64 * 1024 * 1024


def _read_image(store, image_id: int) -> tuple[bytes, str | None] | None:
    """(bytes, media type) of an indexed image, or None if absent. Only the store resolves paths.

    The bytes served are the bytes indexed: their sha256 must equal the stored one, so a file
    replaced after indexing, or a hard link planted in the images root, is never served.

    Raises:
        ApiError: 409 ``image_changed`` when the file's sha256 differs from the stored one.
    """
    rec = store.get(image_id)
    path = store.image_path(image_id)
    if rec is None or path is None or not path.is_file():
        return None
    with open(path, "rb") as fh:
        data = fh.read(MAX_SERVED_BYTES + 1)
    if len(data) > MAX_SERVED_BYTES:
        raise ApiError(413, "too_large", f"image {image_id} is over {MAX_SERVED_BYTES} bytes; not served")
    if hashlib.sha256(data).hexdigest() != rec.sha256:
        log.warning("image %d: the file at its path is not the one indexed (sha256 differs); not served", image_id)
        raise ApiError(409, "image_changed", f"image {image_id} changed on disk since it was indexed; "
                                             "re-index it to serve it again")
    return data, image_media_type(data[:16])


@router.get("/{image_id}", name="get_image", response_class=Response, summary="An indexed image",
            responses={200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}, "image/gif": {}}},
                       **errors(404, 409, 413, 422, 503)})
async def get_image(image_id: ImageId, state: ReadyDep) -> Response:
    """The image file of an indexed id, served only from the index's images root or its uploads,
    and only if its sha256 is still the one indexed."""
    found = await state.read(_read_image, state.store, image_id)
    if found is None:
        raise _not_found(image_id)
    data, media_type = found
    if media_type is None:  # not an image format we serve inline
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{image_id}.bin"'})
    return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=300"})


@router.get("/{image_id}/similar", response_model=SearchResponse, summary="Search by an indexed image",
            responses=errors(404, 422, 503))
async def similar(request: Request, image_id: ImageId, state: ReadyDep,
                  k: Annotated[int | None, Query(description="hits wanted (1..max_k)")] = None,
                  offset: Annotated[int | None, Query(description="skip this many best hits (pagination); "
                                                                  "offset + k <= max_k")] = None,
                  label: Annotated[str | None, Query(max_length=200,
                                                     description="only images with exactly this label")] = None,
                  exclude_label: Annotated[str | None, Query(
                      max_length=200, description="no image with exactly this label (unlabelled images stay)")] = None,
                  ) -> JSONResponse:
    """The ``k`` images most similar to an already indexed one (itself excluded).

    ``offset`` pages through the ranking; ``label`` / ``exclude_label`` filter by label and still
    return ``k`` hits when ``k`` match."""
    t0 = time.perf_counter()
    w = parse_window(state.settings, k, offset, label, exclude_label)
    with state.admit():
        try:
            hits = await state.search_thread(lambda: state.store.search_by_id(image_id, w.k, **w.search_kwargs()))
        except KeyError:
            raise _not_found(image_id) from None
    return search_response(request, state, hits, w.k, t0, w.offset)


@router.post(
    "",
    response_model=AddImageResponse,
    status_code=201,
    summary="Add an uploaded image (API key)",
    openapi_extra=upload_openapi(("label", {"type": "string", "maxLength": 200, "description": "optional label"})),
    responses={200: {"model": AddImageResponse, "description": "the same bytes were already indexed"},
               **errors(400, 401, 403, 413, 415, 422, 503)},
)
@admits_queries
async def add_image(request: Request, response: Response, state: WriterDep) -> AddImageResponse:
    """Embed and index an uploaded image. A 201 means it is durable and the next search sees it;
    200 means the identical file was already indexed (the existing record is returned)."""
    with state.admit() as ticket:
        upload = await read_upload(request, state.settings.max_upload_bytes)
        label = parse_label(upload.fields.get("label"))
        vector = await state.embed_upload(ticket, upload.data)
        ext = image_ext(upload.data)

        def add(store):
            before = len(store)
            rec = store.add_upload(upload.data, vector, label=label, ext=ext)
            return rec, len(store) > before, len(store)

        rec, created, size = await state.write(add)
    response.status_code = 201 if created else 200
    return AddImageResponse(image=_image_out(request, rec), created=created, index_size=size)


@router.delete("/{image_id}", response_model=DeleteResponse, summary="Delete an image (API key)",
               responses=errors(401, 403, 404, 422, 503))
async def delete_image(image_id: ImageId, state: WriterDep) -> DeleteResponse:
    """Remove an image from the index. A 200 means it is durable and no later search returns it."""
    removed, size = await state.write(lambda store: (store.remove([image_id]), len(store)))
    if removed == 0:
        raise _not_found(image_id)
    return DeleteResponse(id=image_id, deleted=True, index_size=size)
