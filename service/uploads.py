"""Reading an uploaded image from a multipart request, and turning it into a model input.

The request body is already capped by :class:`service.middleware.BodyLimitMiddleware`; this
module parses the form, checks the file field's size, and decodes it through
:func:`models.decode_image` (format decided by content, never by filename or header).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request

from models.decode import DecodeLimits
from models.preprocess import Preprocess
from service.errors import ApiError

MAX_FIELD_BYTES = 16 * 1024
MAX_LABEL_CHARS = 200


@dataclass
class Upload:
    data: bytes | None         # the file's bytes, at most the upload limit (None: no file, when optional)
    fields: dict[str, str]     # the other form fields


def upload_openapi(*fields: tuple[str, dict]) -> dict:
    """OpenAPI ``requestBody`` for a multipart upload with a ``file`` part and extra fields."""
    props = {"file": {"type": "string", "format": "binary", "description": "the image (JPEG, PNG, WebP or GIF)"}}
    props.update(dict(fields))
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                                           "properties": props}}},
        }
    }


async def read_upload(request: Request, max_upload_bytes: int, *, file_required: bool = True,
                      what: str = "the image as multipart/form-data with a 'file' field") -> Upload:
    """Parse a form with at most one ``file`` part (required unless ``file_required=False``).

    Without a required file, ``application/x-www-form-urlencoded`` is accepted too and
    ``Upload.data`` is None when no file was sent. ``what`` completes the 415 message
    ("send ...").

    Raises:
        ApiError: 415 not multipart (or not a form), 400 malformed multipart, 422 no ``file``
            part when required, 413 file over ``max_upload_bytes``.
    """
    ctype = request.headers.get("content-type", "").lower()
    kinds = ("multipart/form-data",) if file_required else ("multipart/form-data", "application/x-www-form-urlencoded")
    if not ctype.startswith(kinds):
        raise ApiError(415, "unsupported_media_type", f"send {what}")
    try:
        form = await request.form(max_files=1, max_fields=16, max_part_size=MAX_FIELD_BYTES)
    except MultiPartException as exc:
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {exc.message}") from None
    except HTTPException as exc:  # Starlette turns MultiPartException into a 400 inside an app
        if exc.status_code != 400:
            raise
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {exc.detail}") from None
    except ClientDisconnect:
        raise ApiError(400, "bad_request", "client disconnected while sending the body") from None
    try:
        data = None
        file = form.get("file")
        if isinstance(file, UploadFile):
            data = await file.read(max_upload_bytes + 1)
            if len(data) > max_upload_bytes:
                raise ApiError(413, "too_large", f"image is over the limit of {max_upload_bytes} bytes")
        elif file_required:
            raise ApiError(422, "invalid_parameter", "file: an image file part named 'file' is required")
        fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
    finally:
        await form.close()
    return Upload(data=data, fields=fields)


def parse_k(raw: str | int | None, default: int, max_k: int) -> int:
    """``k`` from a form or query value: an integer in [1, max_k] (422 otherwise)."""
    if raw is None or raw == "":
        return default
    try:
        k = int(raw)
    except (TypeError, ValueError):
        raise ApiError(422, "invalid_parameter", f"k: must be an integer, got {str(raw)[:32]!r}") from None
    if not 1 <= k <= max_k:
        raise ApiError(422, "invalid_parameter", f"k: must be between 1 and {max_k}, got {k}")
    return k


def parse_label(raw: str | None) -> str | None:
    """Optional label: stripped, at most 200 printable characters; empty means none."""
    if raw is None:
        return None
    label = raw.strip()
    if not label:
        return None
    if len(label) > MAX_LABEL_CHARS or not label.isprintable():
        raise ApiError(422, "invalid_parameter", f"label: at most {MAX_LABEL_CHARS} printable characters")
    return label


def decode_to_input(data: bytes, preprocess: Preprocess, limits: DecodeLimits,
                    jpeg_draft: bool = True) -> np.ndarray:
    """Decode ``data`` safely and preprocess it -> (3, S, S) float32 model input.

    Per-request decode bound (:meth:`models.preprocess.Preprocess.load`): memory is the first
    frame's decoded raster (at most ``limits.max_pixels`` x 4 bytes; JPEGs are drafted to the
    model's size) plus a few MiB of conversion strips, whatever the aspect ratio, bit depth,
    alpha or frame count; time is linear in the first frame's pixels.

    Raises:
        models.ImageDecodeError: the image was refused (mapped to 400/413/415 by the app).
    """
    return preprocess.load(data, limits=limits, source="upload", jpeg_draft=jpeg_draft)
