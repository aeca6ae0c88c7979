"""A small typed Python client for the lookalike REST API (synchronous, on httpx).

::

    from lookalike.client import Client

    with Client("http://127.0.0.1:8000") as api:
        for hit in api.search("bird.jpg", k=5).hits:
            print(f"{hit.score:.3f}  {hit.label}  {hit.path}")

Every error answer of the service (``{"error": {"code", "message"}}``) is raised as
:class:`LookalikeError` carrying its HTTP status, code and message; a failure to reach the
service is a :class:`LookalikeError` with ``status=None`` and code ``transport_error``.

Images are given as a path, bytes, or a binary file object. Only ``httpx`` is imported, so
the client works without torch, FAISS or the service installed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Union
from urllib.parse import quote

import httpx

log = logging.getLogger(__name__)

#: An image to upload: a file path, its bytes, or a binary file object opened for reading.
ImageInput = Union[str, os.PathLike, bytes, IO[bytes]]

__all__ = ["AddResult", "BatchItem", "Client", "CollectionStatus", "DeleteResult", "Hit", "ImageInfo", "ImageInput",
           "IndexInfo", "LookalikeError", "SearchResult"]


class LookalikeError(Exception):
    """An error answer of the service, or a failure to reach it.

    Attributes:
        status: HTTP status (None when the service could not be reached).
        code: machine-readable reason from the service, e.g. ``truncated``, ``not_found``,
            ``unauthorized``, ``unavailable``; ``transport_error`` when unreachable.
        message: what went wrong, in words.
        retry_after: seconds from a 503's ``Retry-After`` header, else None.
    """

    def __init__(self, status: int | None, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status or 'no response'} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class Hit:
    """One ranked result; ``score`` is a cosine similarity in [-1, 1], higher is more similar."""

    id: int
    score: float
    path: str
    label: str | None
    image_url: str


@dataclass(frozen=True)
class SearchResult:
    """The hits of one query (ranks ``offset .. offset+k-1``) and what answered it."""

    hits: list[Hit]
    k: int
    offset: int
    model: str  #: fingerprint of the model that embedded the query
    index: int  #: generation of the index searched
    took_ms: float


@dataclass(frozen=True)
class BatchItem:
    """The answer for one image of :meth:`Client.search_batch`: hits, or the error it alone got."""

    filename: str | None
    status: int
    hits: list[Hit] | None
    error: LookalikeError | None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ImageInfo:
    """An indexed image's metadata."""

    id: int
    path: str
    label: str | None
    sha256: str
    size: int
    source: str  #: "folder" or "upload"
    added_at: float
    image_url: str


@dataclass(frozen=True)
class AddResult:
    image: ImageInfo
    created: bool  #: False when the same bytes were already indexed (nothing added)
    index_size: int


@dataclass(frozen=True)
class DeleteResult:
    id: int
    deleted: bool
    index_size: int


@dataclass(frozen=True)
class IndexInfo:
    """``GET /v1/index``: size, structure and model of the served index."""

    size: int
    dim: int
    factory: str
    metric: str
    model: str
    generation: int
    recall_at_10: float | None
    recall_target: float | None
    faiss_version: str | None
    writable: bool
    backend: str


@dataclass(frozen=True)
class CollectionStatus:
    """One collection of the service (``GET /v1/collections``)."""

    name: str
    status: str  #: "ready", "loading", "failed" or "stopping"
    model: str  #: fingerprint of its model ("" until loaded)
    backend: str
    index_size: int
    generation: int
    writable: bool


def _hits(rows: Iterable[dict]) -> list[Hit]:
    return [Hit(id=int(r["id"]), score=float(r["score"]), path=r["path"], label=r.get("label"),
                image_url=r["image_url"]) for r in rows]


def _search_result(body: dict) -> SearchResult:
    return SearchResult(hits=_hits(body["results"]), k=int(body["k"]), offset=int(body.get("offset", 0)),
                        model=body["model"], index=int(body["index"]), took_ms=float(body["took_ms"]))


def _image_info(d: dict) -> ImageInfo:
    return ImageInfo(id=int(d["id"]), path=d["path"], label=d.get("label"), sha256=d["sha256"], size=int(d["size"]),
                     source=d["source"], added_at=float(d["added_at"]), image_url=d["image_url"])


def _file_part(image: ImageInput, index: int = 0) -> tuple[str, bytes]:
    """(filename, bytes) of an image input. The service decides the format by content."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"image{index}", bytes(image)
    if isinstance(image, (str, os.PathLike)):
        p = Path(image)
        return p.name, p.read_bytes()
    if hasattr(image, "read"):
        data = image.read()
        if not isinstance(data, bytes):
            raise TypeError("open the image file in binary mode ('rb')")
        return Path(getattr(image, "name", f"image{index}")).name, data
    raise TypeError(f"an image is a path, bytes or a binary file object, got {type(image).__name__}")


def _window(k: int | None, offset: int, label: str | None, exclude_label: str | None) -> dict[str, str]:
    fields = {"offset": str(int(offset))} if offset else {}
    if k is not None:
        fields["k"] = str(int(k))
    if label is not None:
        fields["label"] = label
    if exclude_label is not None:
        fields["exclude_label"] = exclude_label
    return fields


class Client:
    """Synchronous client of one lookalike service.

    Args:
        base_url: the service's address, e.g. ``http://127.0.0.1:8000`` (a path prefix behind a
            proxy is kept: ``https://host/lookalike``).
        api_key: bearer key for :meth:`add` and :meth:`delete` (default: ``LOOKALIKE_API_KEY``
            from the environment, if set).
        timeout: seconds per request.
        http: an ``httpx.Client`` to use instead of making one (its ``base_url`` is used; e.g.
            FastAPI's ``TestClient`` in tests). The caller closes it.
        collection: the named collection to search and write (``/v1/collections/{name}/...``);
            None = the default collection (``/v1/...``).
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout: float = 30.0, http: httpx.Client | None = None, collection: str | None = None) -> None:
        self._own = http is None
        self._http = http if http is not None else httpx.Client(base_url=base_url, timeout=timeout)
        self._api_key = api_key if api_key is not None else (os.environ.get("LOOKALIKE_API_KEY") or None)
        self.collection = collection
        self._prefix = "/v1" if collection is None else f"/v1/collections/{quote(collection, safe='')}"

    def in_collection(self, name: str | None) -> "Client":
        """A client of collection ``name`` (None = the default) sharing this one's connection
        and key; closing it leaves this one open."""
        return Client(http=self._http, api_key=self._api_key, collection=name)

    # ---- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        if self._own:
            self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing -----------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, auth: bool = False, scoped: bool = True,
                 **kw: Any) -> httpx.Response:
        """``method`` on ``path``, which when ``scoped`` is relative to this client's collection
        (``/search`` is ``/v1/search`` or ``/v1/collections/{name}/search``); error answers raise."""
        if scoped:
            path = self._prefix + path
        headers = kw.pop("headers", {})
        if auth:
            if not self._api_key:
                raise LookalikeError(None, "unauthorized", "this call needs an API key: pass api_key= or set "
                                                           "LOOKALIKE_API_KEY")
            headers["Authorization"] = f"Bearer {self._api_key}"
        try:
            resp = self._http.request(method, path, headers=headers, **kw)
        except httpx.TransportError as exc:
            raise LookalikeError(None, "transport_error", f"{method} {path}: {exc}") from exc
        if resp.is_success:
            return resp
        raise self._error(resp)

    @staticmethod
    def _error(resp: httpx.Response) -> LookalikeError:
        retry = resp.headers.get("retry-after")
        try:
            retry_after = float(retry) if retry is not None else None
        except ValueError:
            retry_after = None
        try:
            err = resp.json()["error"]
            return LookalikeError(resp.status_code, str(err["code"]), str(err["message"]), retry_after)
        except (ValueError, KeyError, TypeError):  # not the service's JSON (e.g. a proxy's page)
            return LookalikeError(resp.status_code, f"http_{resp.status_code}", resp.text[:200], retry_after)

    # ---- search -------------------------------------------------------------------------------
    def search(self, image: ImageInput, *, k: int | None = None, offset: int = 0, label: str | None = None,
               exclude_label: str | None = None) -> SearchResult:
        """The ``k`` indexed images most similar to ``image`` (``POST /v1/search``).

        ``offset`` pages through the ranking (``offset + k <= max_k``); ``label`` keeps only that
        label, ``exclude_label`` drops one (k hits still come back when k match).
        """
        name, data = _file_part(image)
        resp = self._request("POST", "/search", files={"file": (name, data)},
                             data=_window(k, offset, label, exclude_label))
        return _search_result(resp.json())

    def similar(self, image_id: int, *, k: int | None = None, offset: int = 0, label: str | None = None,
                exclude_label: str | None = None) -> SearchResult:
        """The ``k`` images most similar to the indexed image ``image_id``, itself excluded."""
        resp = self._request("GET", f"/images/{int(image_id)}/similar",
                             params=_window(k, offset, label, exclude_label))
        return _search_result(resp.json())

    def search_batch(self, images: Sequence[ImageInput], *, k: int | None = None, offset: int = 0,
                     label: str | None = None, exclude_label: str | None = None) -> list[BatchItem]:
        """One result list per image, in order (``POST /v1/search/batch``, up to 32 images).

        An image the service refuses does not raise: its item carries the error
        (``item.error``, a :class:`LookalikeError`); an error of the whole request raises.
        """
        if not images:
            raise ValueError("search_batch needs at least one image")
        files = [("file", _file_part(im, i)) for i, im in enumerate(images)]
        resp = self._request("POST", "/search/batch", files=files, data=_window(k, offset, label, exclude_label))
        items = []
        for it in resp.json()["items"]:
            err = it.get("error")
            items.append(BatchItem(
                filename=it.get("filename"), status=int(it["status"]),
                hits=_hits(it["results"]) if it.get("results") is not None else None,
                error=LookalikeError(int(it["status"]), err["code"], err["message"]) if err else None))
        return items

    def search_mean(self, images: Sequence[ImageInput] = (), *, ids: Sequence[int] = (), k: int | None = None,
                    offset: int = 0, label: str | None = None, exclude_label: str | None = None) -> SearchResult:
        """"More like these": search by the renormalised mean of several images' unit vectors.

        ``images`` are uploaded; ``ids`` are indexed images (left out of the results).
        """
        if not images and not ids:
            raise ValueError("search_mean needs at least one image or id")
        files = [("file", _file_part(im, i)) for i, im in enumerate(images)]
        data: dict[str, Any] = dict(_window(k, offset, label, exclude_label))
        if ids:
            data["id"] = [str(int(i)) for i in ids]
        resp = self._request("POST", "/search/mean", files=files or None, data=data)
        return _search_result(resp.json())

    # ---- images -------------------------------------------------------------------------------
    def image(self, image_id: int) -> bytes:
        """The file bytes of an indexed image."""
        return self._request("GET", f"/images/{int(image_id)}").content

    def add(self, image: ImageInput, *, label: str | None = None) -> AddResult:
        """Index an image (API key). Durable when it returns; ``created`` is False if the same
        bytes were already indexed."""
        name, data = _file_part(image)
        resp = self._request("POST", "/images", auth=True, files={"file": (name, data)},
                             data={"label": label} if label is not None else {})
        body = resp.json()
        return AddResult(image=_image_info(body["image"]), created=bool(body["created"]),
                         index_size=int(body["index_size"]))

    def delete(self, image_id: int) -> DeleteResult:
        """Remove an indexed image (API key). Durable when it returns; 404 if unknown."""
        body = self._request("DELETE", f"/images/{int(image_id)}", auth=True).json()
        return DeleteResult(id=int(body["id"]), deleted=bool(body["deleted"]), index_size=int(body["index_size"]))

    def collections(self) -> list[CollectionStatus]:
        """Every collection the service has, the default first, with its state (``GET /v1/collections``)."""
        resp = self._request("GET", "/v1/collections", scoped=False)
        return [CollectionStatus(name=c["name"], status=c["status"], model=c["model"], backend=c["backend"],
                                 index_size=int(c["index_size"]), generation=int(c["generation"]),
                                 writable=bool(c["writable"])) for c in resp.json()["collections"]]

    def index_info(self) -> IndexInfo:
        """Size, factory, metric, model fingerprint, generation and measured recall of the index."""
        b = self._request("GET", "/index").json()
        return IndexInfo(size=int(b["size"]), dim=int(b["dim"]), factory=b["factory"], metric=b["metric"],
                         model=b["model"], generation=int(b["generation"]), recall_at_10=b.get("recall_at_10"),
                         recall_target=b.get("recall_target"), faiss_version=b.get("faiss_version"),
                         writable=bool(b["writable"]), backend=b["backend"])
