"""The one settings definition of the service, read from the environment (prefix ``LOOKALIKE_``).

Every knob of ``lookalike serve`` lives here: ``LOOKALIKE_MODEL_DIR=runs/x LOOKALIKE_INDEX_DIR=idx
LOOKALIKE_API_KEY=... lookalike serve``. Values are validated once at start-up; a bad value or a
missing API key (while writes are enabled) refuses to start with a message naming the setting.

More indexes are served as named collections with ``LOOKALIKE_COLLECTIONS`` (JSON, see
:class:`CollectionConfig`); ``LOOKALIKE_INDEX_DIR`` is the ``default`` collection.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024

#: The collection the single-index routes (``/v1/search``, ``/v1/images``...) serve:
#: ``LOOKALIKE_INDEX_DIR`` with ``LOOKALIKE_MODEL_DIR``. It is also ``/v1/collections/default/...``.
DEFAULT_COLLECTION = "default"
#: What a collection name may look like (it is a URL path segment).
COLLECTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class CollectionConfig(BaseModel):
    """One named collection: an index directory, and the model that embeds its queries.

    In ``LOOKALIKE_COLLECTIONS`` a bare string is the index directory (served with the default
    model, ``LOOKALIKE_MODEL_DIR``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    index_dir: Path = Field(description="index directory made by `lookalike index build`")
    model_dir: Path | None = Field(None, description="model the index was built with; None = LOOKALIKE_MODEL_DIR")
    images_root: Path | None = Field(None, description="where this index's images are, if not where it was built")


class Settings(BaseSettings):
    """Service configuration. Environment variables are ``LOOKALIKE_<FIELD>`` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="LOOKALIKE_", extra="ignore", frozen=True)

    # --- what to serve -------------------------------------------------------------------------
    model_dir: Path | None = Field(None, description="model or training-run directory (card.json + weights)")
    index_dir: Path | None = Field(None, description="index directory made by `lookalike index build`")
    images_root: Path | None = Field(
        None, description="where the indexed folder's images are, if not where the index was built (e.g. a container mount)"
    )
    collections: dict[str, CollectionConfig] = Field(
        default_factory=dict,
        description="more named collections beside the default one, served under /v1/collections/{name}/..., as "
        "JSON: {\"name\": \"INDEX_DIR\"} or {\"name\": {\"index_dir\": ..., \"model_dir\": ..., \"images_root\": ...}}; "
        "collections with the same model share one loaded copy of it",
    )
    backend: Literal["auto", "torch", "onnx", "openvino"] = Field(
        "auto",
        description="inference backend; 'auto' = the fastest on this CPU by a short measurement of each "
        "installed runtime (saved beside the model as backend.json, re-measured on another CPU)",
    )
    bf16: bool | None = Field(
        None, description="torch bf16 autocast; None = fp32 with backend auto (bf16 changes 3% of top-10 "
        "neighbours), with backend torch when the CPU supports it natively")

    # --- writes and auth -----------------------------------------------------------------------
    api_key: SecretStr | None = Field(None, description="bearer key required by POST/DELETE /v1/images")
    writes_enabled: bool = Field(True, description="false: the index is opened read-only and writes answer 403")

    # --- input limits --------------------------------------------------------------------------
    max_upload_bytes: int = Field(10 * MiB, ge=1, description="largest accepted image file")
    max_pixels: int = Field(40_000_000, ge=1, description="largest accepted width*height")
    max_full_decode_pixels: int = Field(
        4_000_000, ge=1, description="largest width*height of an upload decoded at full size: PNG, WebP and GIF "
        "(a JPEG can decode at a reduced scale and obeys max_pixels only); bounds an upload's decode time and memory")
    max_side: int = Field(8192, ge=1, description="largest accepted image side in px")
    multipart_overhead_bytes: int = Field(
        64 * 1024, ge=1024, description="request body allowance on top of max_upload_bytes (form fields, boundaries)"
    )
    max_k: int = Field(100, ge=1, le=10_000, description="largest k a client may ask for")
    default_k: int = Field(10, ge=1)
    jpeg_draft: bool = Field(True, description="decode large JPEGs at a reduced DCT scale no smaller than needed")

    # --- performance ---------------------------------------------------------------------------
    max_batch: int = Field(16, ge=1, le=1024, description="most queries per forward pass (1 = no micro-batching)")
    batch_wait_ms: float = Field(
        2.0, ge=0.0, le=1000.0,
        description="longest wait for more queries to fill a batch, only while other queries are being decoded",
    )
    max_pending: int = Field(64, ge=1, description="queries admitted at once; beyond it requests get 503 at once")
    max_queue_wait_ms: float = Field(
        300.0, ge=0.0, description="refuse a query (503 + Retry-After, before its body is read) when the queries "
        "already admitted are expected to keep it waiting longer than this: pending queries x the measured "
        "seconds per query under load (0 = limit by max_pending only)")
    inference_threads: int = Field(1, ge=1, description="torch / ONNX Runtime intra-op threads")
    inference_workers: int = Field(
        0, ge=0, description="inference threads taking batches from one queue, each with its own handle on the "
        "model (ONNX Runtime / OpenVINO; torch always runs one); 0 = two on machines with two or more cores "
        "(one thread left 0.5 of 2 cores idle at concurrency 8)")
    search_threads: int = Field(1, ge=1, description="FAISS OpenMP threads in the search thread")
    idle_threads: int = Field(
        0, ge=0, description="threads of a lone query's forward pass and search when nothing else waits "
        "(0 = every core, 1 = off); kept only while measured faster than one thread (other work on the cores "
        "makes extra threads slower), see service.batching.ThreadPolicy")
    decode_threads: int = Field(2, ge=1, description="threads decoding and preprocessing uploads")
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 503")
    load_in_background: bool = Field(
        False, description="start answering (503 until ready) while the model and index load"
    )
    refresh_interval_s: float = Field(
        5.0, ge=0.0, description="read-only servers: pick up another process's index writes this often (0 = never)"
    )
    min_free_mb: float = Field(
        64.0, ge=0, description="writes answer 507 while the index volume has less free space than this, "
        "keeping room for the index's own checkpoint; they resume by themselves once space is freed")
    checkpoint_every: int = Field(
        1000, ge=0, description="publish a new index generation after this many writes (0 = only at shutdown)"
    )

    # --- HTTP ----------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    cors_origins: list[str] = Field(default_factory=list, description="allowed CORS origins; empty = CORS closed")
    access_log: bool = False
    limit_concurrency: int = Field(
        512, ge=1, description="requests in progress (headers received) beyond this get JSON 503 + Retry-After; "
        "connections still sending headers do not count")
    timeout_keep_alive: int = Field(5, ge=1)
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request's headers must all arrive within this (408 JSON, or close if none came)")
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body must fully arrive within this (408 JSON); only then does the "
        "request count against inference admission")
    max_header_count: int = Field(100, ge=8, description="more request headers get 431 JSON")
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="request line + headers over this get 431 JSON")
    max_buffered_body_bytes: int = Field(
        256 * MiB, ge=1, description="request bodies held in memory at once, all requests together; beyond: 503")
    graceful_shutdown_s: float = Field(
        10.0, ge=0, description="on SIGTERM, wait this long for requests in progress, then close them; the index "
        "checkpoint runs after either way")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v):
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("collections", mode="before")
    @classmethod
    def _index_dir_shorthand(cls, v):
        if isinstance(v, dict):
            return {name: {"index_dir": c} if isinstance(c, (str, Path)) else c for name, c in v.items()}
        return v

    @field_validator("collections")
    @classmethod
    def _collection_names(cls, v: dict[str, CollectionConfig]) -> dict[str, CollectionConfig]:
        for name in v:
            if name == DEFAULT_COLLECTION:
                raise ValueError(f"collection name {name!r} is reserved for LOOKALIKE_INDEX_DIR; choose another")
            if not COLLECTION_NAME.fullmatch(name):
                raise ValueError(f"collection name {name[:80]!r} is not allowed: use 1-64 letters, digits, '_' or '-', "
                                 "starting with a letter or digit")
        return v

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.writes_enabled and (self.api_key is None or not self.api_key.get_secret_value().strip()):
            raise ValueError(
                "LOOKALIKE_API_KEY is not set: writes (POST/DELETE /v1/images) need an API key. "
                "Set LOOKALIKE_API_KEY, or set LOOKALIKE_WRITES_ENABLED=false to serve read-only"
            )
        if self.api_key is not None and len(self.api_key.get_secret_value()) < 16:
            raise ValueError("LOOKALIKE_API_KEY must be at least 16 characters")
        if self.default_k > self.max_k:
            raise ValueError(f"default_k={self.default_k} is over max_k={self.max_k}")
        unmodelled = [name for name, c in self.collections.items() if c.model_dir is None]
        if unmodelled and self.model_dir is None:
            raise ValueError(f"collections {unmodelled} name no model_dir and LOOKALIKE_MODEL_DIR is not set: "
                             "give each a model_dir, or set LOOKALIKE_MODEL_DIR")
        return self

    @property
    def idle_thread_count(self) -> int:
        """``idle_threads`` resolved: 0 means this machine's core count."""
        import os

        return self.idle_threads or os.cpu_count() or 1

    @property
    def inference_worker_count(self) -> int:
        """``inference_workers`` resolved: 0 means two where the machine has two cores or more."""
        import os

        return self.inference_workers or min(2, os.cpu_count() or 1)

    @property
    def max_body_bytes(self) -> int:
        """Largest request body read: the image limit plus the multipart allowance."""
        return self.max_upload_bytes + self.multipart_overhead_bytes
