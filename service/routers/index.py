"""``GET /v1/index``: what is being served."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import ReadyDep
from service.routers.common import errors
from service.schemas import IndexInfo

router = APIRouter(prefix="/v1", tags=["index"])


@router.get("/index", response_model=IndexInfo, summary="Index size, factory, model, measured recall",
            responses=errors(503))
async def index_info(state: ReadyDep) -> IndexInfo:
    info = await state.read(state.store.info)
    return IndexInfo(
        size=int(info.get("ntotal", len(state.store))),
        dim=int(info.get("dim", state.store.dim)),
        factory=str(info.get("factory", "")),
        metric=str(info.get("metric", "inner_product")),
        model=str(info.get("fingerprint", state.store.fingerprint)),
        generation=int(info.get("generation", state.store.generation)),
        recall_at_10=info.get("recall_at_10"),
        recall_target=info.get("recall_target"),
        faiss_version=info.get("faiss_version"),
        writable=state.writable,
        backend=state.backend_name,
    )
