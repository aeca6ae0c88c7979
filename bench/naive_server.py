"""The naive baseline server for bench_service.py: all work inline in an ``async def`` handler.

This is the server one writes first: FastAPI ``File``/``Form`` parameters, decode + embed +
search called directly in the handler (so they run on the event loop and queries are served
one at a time), no batching, no admission control; inference threads are the libraries'
defaults unless ``--threads`` is given. It also has
``POST /empty``, which only reads the upload: the floor cost of HTTP + multipart parsing.

Run: ``python bench/naive_server.py --model M --index I --port 8001 [--backend torch|onnx]``.
"""

from __future__ import annotations

import argparse
import logging
import os

from fastapi import FastAPI, File, Form, UploadFile  # module level: the handler's annotations need them


def create_app(model_dir: str, index_dir: str, backend_name: str = "torch", threads: int = 0):
    from index import IndexStore
    from models import decode_image
    from models.backends import load_backend

    # threads 0: the libraries' defaults (torch: one per core; ONNX Runtime: one per core)
    if backend_name in ("onnx", "openvino"):
        backend = load_backend(model_dir, backend_name, threads=threads or (os.cpu_count() or 1))
    else:
        if threads:
            import torch

            torch.set_num_threads(threads)
        backend = load_backend(model_dir, "torch")
    store = IndexStore.open(index_dir, card=backend.card)
    draft = backend.preprocess.draft_size()
    app = FastAPI()

    @app.post("/v1/search")
    async def search(file: UploadFile = File(...), k: int = Form(10)):
        data = await file.read()
        img = decode_image(data, draft_size=draft)
        vector = backend.embed_images([img])
        hits = store.search(vector, k)[0]
        return {"results": [{"id": h.id, "score": h.score, "path": h.path, "label": h.label} for h in hits], "k": k}

    @app.post("/empty")
    async def empty(file: UploadFile = File(...)):
        await file.read()
        return {"results": []}

    @app.get("/readyz")
    async def readyz():
        return {"status": "ready"}

    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "openvino"])
    p.add_argument("--threads", type=int, default=0, help="inference threads (0 = library default)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    uvicorn.run(create_app(args.model, args.index, args.backend, args.threads), host=args.host, port=args.port,
                access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
