"""Typed request/response models of the REST API (they also make the OpenAPI document)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. 'truncated', 'too_large', 'unauthorized'")
    message: str = Field(description="what went wrong, in words")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class SearchResult(BaseModel):
    id: int = Field(description="stable image id")
    score: float = Field(description="cosine similarity in [-1, 1]; higher is more similar")
    path: str = Field(description="path of the image relative to its root, for display")
    label: str | None = Field(description="class label, if known")
    image_url: str = Field(description="URL of the image on this service")


class SearchResponse(BaseModel):
    results: list[SearchResult] = Field(description="at most k hits, best first (ranks offset .. offset+k-1)")
    k: int = Field(description="hits asked for")
    offset: int = Field(0, description="best hits skipped before these (pagination); offset + k <= max_k")
    model: str = Field(description="fingerprint of the model that embedded the query")
    index: int = Field(description="generation of the index searched")
    took_ms: float = Field(description="server time for this request in milliseconds")


class BatchItem(BaseModel):
    """The answer for one image of a batch: its hits, or the error it alone would have got."""

    filename: str | None = Field(description="the file part's filename, if the client sent one")
    status: int = Field(description="200, or the HTTP status this image alone would have got (400, 413, 415, ...)")
    results: list[SearchResult] | None = Field(None, description="hits, best first; absent on error")
    error: ErrorDetail | None = Field(None, description="why this image failed; absent on success")


class BatchSearchResponse(BaseModel):
    items: list[BatchItem] = Field(description="one per uploaded file, in the order sent")
    k: int = Field(description="hits asked for per image")
    offset: int = Field(description="best hits skipped per image")
    model: str = Field(description="fingerprint of the model that embedded the queries")
    index: int = Field(description="generation of the index searched")
    took_ms: float = Field(description="server time for this request in milliseconds")


class ImageOut(BaseModel):
    id: int
    path: str
    label: str | None
    sha256: str
    size: int = Field(description="bytes of the image file")
    source: str = Field(description="'folder' (indexed from the images root) or 'upload'")
    added_at: float = Field(description="unix time the image was indexed")
    image_url: str


class AddImageResponse(BaseModel):
    image: ImageOut
    created: bool = Field(description="false when the same bytes were already indexed (nothing added)")
    index_size: int


class DeleteResponse(BaseModel):
    id: int
    deleted: bool
    index_size: int


class IndexInfo(BaseModel):
    size: int = Field(description="vectors in the index")
    dim: int
    factory: str = Field(description="FAISS factory string")
    metric: str
    model: str = Field(description="model fingerprint the index was built with")
    generation: int
    recall_at_10: float | None = Field(description="measured recall@10 of the ANN index against exact search")
    recall_target: float | None
    faiss_version: str | None
    writable: bool = Field(description="whether this service accepts writes")
    backend: str = Field(description="inference backend in use (torch or onnx)")


class Health(BaseModel):
    status: str


class CollectionStatus(BaseModel):
    """One collection: its state, and once loaded what it serves."""

    name: str = Field(description="the name in /v1/collections/{name}/...; 'default' is LOOKALIKE_INDEX_DIR")
    status: str = Field(description="'ready', 'loading', 'failed' (see the server log) or 'stopping'")
    model: str = Field(description="fingerprint of the collection's model ('' until loaded)")
    backend: str = Field(description="inference backend of its model ('' until loaded)")
    index_size: int = Field(description="vectors in its index (0 until loaded)")
    generation: int = Field(description="generation of its index (0 until loaded)")
    writable: bool = Field(description="writes are accepted now (enabled, and its index volume not full)")


class CollectionList(BaseModel):
    collections: list[CollectionStatus] = Field(description="every collection served, the default first")


class Readiness(BaseModel):
    status: str
    model: str
    backend: str
    index_size: int
    generation: int
    writable: bool = Field(True, description="writes are accepted now: enabled, and the index volume has "
                                             "at least LOOKALIKE_MIN_FREE_MB free (false while it is full; "
                                             "searches keep working)")
    collections: list[CollectionStatus] = Field(default_factory=list,
                                                description="every collection served, the default first")
    inference: dict | None = Field(None, description="the default model's inference threads as running: "
                                                     "`workers`, `batch_cap` (1: no micro-batching) and "
                                                     "`batching_measured`, the start-up timing behind it")
