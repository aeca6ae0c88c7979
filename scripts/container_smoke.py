#!/usr/bin/env python3
"""Container smoke test: build the serving image with podman and prove it works end to end.

    .venv/bin/python scripts/container_smoke.py        (after scripts/podman_setup.sh, as root)

Steps (each timed, any failure exits 1 with a message naming the step):
  1. ``podman build --target serve`` (layers cached: dependencies before sources);
  2. on the host (.venv, torch): an untrained resnet18 at 64 px saved with ``models.save_model``,
     ``lookalike export --onnx``, and ``lookalike index build`` over a few generated images;
  3. ``podman run`` on 127.0.0.1 (read-only root FS, all capabilities dropped), model mounted
     read-only at /model, index read-write at /index, the images root read-only at its host path
     (so image URLs resolve); writes enabled with a random API key;
  4. waits for /healthz and /readyz, then through the published port: a search by an indexed
     image (its own path must rank first with cosine ~1), an upload (POST /v1/images, which writes
     /index as the container user), a search finding the upload, and a fetch of an image URL;
  5. ``podman healthcheck run``, ``id -u`` != 0 inside, torch absent from the image;
  6. ``podman stop -t`` must end the service gracefully (exit status 0), the upload must be in
     the index on the host afterwards; then removes the container it started (by id) and the
     temporary files. The image is kept so the next build is cached.

The index directory is written by the service (uploads, deletions; its SQLite database is opened
for writing even when serving read-only), so it is chowned to the image's user before mounting, as
an operator does too (see the Dockerfile header). Env: CONTAINERS_CONF (default
/tmp/lookalike-ctr/containers.conf as written by scripts/podman_setup.sh), LOOKALIKE_SMOKE_IMAGE
(tag, default localhost/lookalike:smoke).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
CTR_DIR = Path(os.environ.get("LOOKALIKE_CTR_DIR", "/tmp/lookalike-ctr"))
BASE_IMAGE = "docker.io/library/debian:bookworm-slim"


class SmokeError(Exception):
    """A failed check; the message says which and why."""


def log(msg: str) -> None:
    print(f"container_smoke: {msg}", flush=True)


def run(cmd: list[str], *, timeout: float = 120, check: bool = True, quiet: bool = False,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd``; on failure raise SmokeError with its output tail."""
    if not quiet:
        log("$ " + " ".join(cmd))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise SmokeError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}") from None
    if check and p.returncode != 0:
        tail = (p.stdout + p.stderr)[-3000:]
        raise SmokeError(f"exit status {p.returncode}: {' '.join(cmd)}\n{tail}")
    return p


class Timer:
    def __init__(self) -> None:
        self.t = {}

    def __call__(self, name: str):
        timer = self

        class _T:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.t[name] = time.perf_counter() - self.t0
                if exc[0] is None:
                    log(f"{name}: {timer.t[name]:.1f} s")

        return _T()


# ---- HTTP (stdlib only: the point is the published port, not a client library) ---------------------
def http(method: str, url: str, *, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 30) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def multipart(fields: dict[str, str], file_name: str, data: bytes, mime: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for k, v in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
              f"Content-Type: {mime}\r\n\r\n".encode())
    out.write(data)
    out.write(f"\r\n--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def post_image(url: str, path: Path, fields: dict[str, str] | None = None,
               headers: dict | None = None) -> tuple[int, dict]:
    body, ctype = multipart(fields or {}, path.name, path.read_bytes(), "image/png")
    status, raw, _ = http("POST", url, body=body, headers={"Content-Type": ctype, **(headers or {})})
    try:
        payload = json.loads(raw)
    except ValueError:
        raise SmokeError(f"POST {url}: HTTP {status}, not JSON: {raw[:300]!r}") from None
    return status, payload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- steps --------------------------------------------------------------------------------------
def preflight(venv: Path) -> None:
    if shutil.which("podman") is None:
        raise SmokeError("podman is not installed: run scripts/podman_setup.sh (as root) first")
    if os.geteuid() != 0:
        raise SmokeError("run as root: podman builds and runs images as root on these machines")
    if not (venv / "bin" / "lookalike").is_file():
        raise SmokeError(f"{venv}/bin/lookalike not found: run scripts/setup first (or pass --venv)")
    if run(["podman", "image", "exists", BASE_IMAGE], check=False, quiet=True).returncode != 0:
        raise SmokeError(f"base image {BASE_IMAGE} is not in podman's store: run scripts/podman_setup.sh")


def build_image(tag: str) -> None:
    cmd = ["podman", "build", "--pull=never", "--layers", "--format", "docker", "--target", "serve", "-t", tag]
    pip_conf = CTR_DIR / "pip.conf"
    if HOST_CA.is_file() and pip_conf.is_file():  # pip inside RUN verifies TLS with this machine's CA
        cmd += ["-v", f"{HOST_CA}:/run/host-ca.crt:ro", "-v", f"{pip_conf}:/etc/pip.conf:ro"]
    cmd.append(str(REPO))
    log("$ " + " ".join(cmd))
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1800)
    if p.returncode != 0:
        raise SmokeError(f"podman build failed (exit {p.returncode}):\n{p.stdout[-5000:]}")
    lines = p.stdout.splitlines()
    steps = sum(" STEP " in f" {ln}" for ln in lines)
    cached = sum(ln.startswith("--> Using cache") for ln in lines)
    log(f"built {tag}: {steps} steps, {cached} from cache")


def make_assets(work: Path, venv: Path) -> tuple[Path, Path, Path, str]:
    """Model (+ model.onnx), images (3 classes x 4) and their index. Returns (model, images, index, fp)."""
    code = r"""
import sys
from pathlib import Path
import numpy as np
import torch
from PIL import Image
from models import ModelCard, save_model
from models.net import EmbeddingNet
work = Path(sys.argv[1])
torch.manual_seed(0)
card = save_model(EmbeddingNet(ModelCard(backbone="resnet18", embedding_dim=32, image_size=64, resize_size=72)),
                  work / "model")
rng = np.random.default_rng(0)
for c, base in enumerate([(200, 40, 40), (40, 180, 60), (50, 60, 210)]):
    d = work / "images" / f"class{c}"
    d.mkdir(parents=True)
    for i in range(4):
        a = np.clip(np.array(base) + rng.normal(0, 40, (96, 96, 3)), 0, 255).astype(np.uint8)
        a[rng.integers(0, 60):, rng.integers(0, 60):] //= 2   # a darker corner block, different per image
        Image.fromarray(a).save(d / f"{i}.png")
extra = np.clip(rng.normal(128, 60, (80, 80, 3)), 0, 255).astype(np.uint8)
Image.fromarray(extra).save(work / "upload.png")
print(card.fingerprint)
"""
    py = str(venv / "bin" / "python")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log("making an untrained resnet18 model (64 px) and 12 images + 1 to upload")
    fp = run([py, "-c", code, str(work)], timeout=300, env=env, quiet=True).stdout.strip().splitlines()[-1]
    la = str(venv / "bin" / "lookalike")
    run([la, "export", "--onnx", str(work / "model")], timeout=300, env=env)
    run([la, "index", "build", "--model", str(work / "model"), "--images", str(work / "images"),
         "--out", str(work / "index"), "--labels-from-folders", "--backend", "onnx", "--workers", "1",
         "--no-progress"], timeout=300, env=env)
    if not (work / "model" / "model.onnx").is_file():
        raise SmokeError(f"lookalike export --onnx wrote no {work}/model/model.onnx")
    return work / "model", work / "images", work / "index", fp


def image_user(tag: str) -> str:
    user = run(["podman", "image", "inspect", "--format", "{{.Config.User}}", tag], quiet=True).stdout.strip()
    if not user or user.split(":")[0] in ("0", "root"):
        raise SmokeError(f"the image {tag} has no non-root USER (Config.User={user!r})")
    return user


def container_logs(cid: str) -> str:
    p = run(["podman", "logs", "--tail", "60", cid], check=False, quiet=True)
    return (p.stdout + p.stderr).strip()


def wait_ready(base: str, cid: str, timeout: float = 120) -> dict:
    """Poll /healthz, then /readyz, until 200; returns the /readyz JSON."""
    deadline = time.monotonic() + timeout
    path = "/healthz"
    while time.monotonic() < deadline:
        state = run(["podman", "inspect", "--format", "{{.State.Status}}", cid], check=False, quiet=True).stdout.strip()
        if state not in ("running", "created", "configured", "initialized"):
            raise SmokeError(f"the container stopped while starting (state {state!r}); its log:\n"
                             + container_logs(cid))
        try:
            status, raw, _ = http("GET", base + path, timeout=5)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            status, raw = 0, b""
        if status == 200 and path == "/healthz":
            log(f"/healthz answered: {raw.decode()}")
            path = "/readyz"
            continue
        if status == 200:
            log(f"/readyz: {raw.decode()}")
            return json.loads(raw)
        time.sleep(0.25)
    raise SmokeError(f"{base}{path} did not answer 200 within {timeout:.0f} s; container log:\n" + container_logs(cid))


def check_search(base: str, query: Path, images: Path, fp: str, n_indexed: int) -> dict:
    status, r = post_image(base + "/v1/search", query, {"k": "5"})
    if status != 200:
        raise SmokeError(f"POST /v1/search: HTTP {status}: {r}")
    for key in ("results", "k", "model", "index", "took_ms"):
        if key not in r:
            raise SmokeError(f"POST /v1/search: no {key!r} in the response {r}")
    res = r["results"]
    if r["k"] != 5 or len(res) != min(5, n_indexed):
        raise SmokeError(f"POST /v1/search: asked k=5 of {n_indexed}, got k={r['k']} and {len(res)} results")
    if r["model"] != fp:
        raise SmokeError(f"POST /v1/search: model fingerprint {r['model']!r}, expected {fp!r}")
    scores = [h["score"] for h in res]
    if scores != sorted(scores, reverse=True) or not all(-1.0001 <= s <= 1.0001 for s in scores):
        raise SmokeError(f"POST /v1/search: scores not descending cosines in [-1, 1]: {scores}")
    want = query.relative_to(images).as_posix()
    top = res[0]
    if top["path"] != want or top["score"] < 0.999:
        raise SmokeError(f"POST /v1/search: searching with indexed image {want} should rank it first with "
                         f"cosine ~1, got {top['path']} ({top['score']:.4f})")
    if top["label"] != query.parent.name:
        raise SmokeError(f"POST /v1/search: label {top['label']!r}, expected {query.parent.name!r}")
    log(f"search OK: top hit {top['path']} score {top['score']:.4f} label {top['label']}, "
        f"{len(res)} results, server {r['took_ms']:.1f} ms")
    return r


def check_writes(base: str, upload: Path, key: str) -> int:
    status, r = post_image(base + "/v1/images", upload, {"label": "smoke"})
    if status != 401:
        raise SmokeError(f"POST /v1/images without the API key: HTTP {status}, expected 401: {r}")
    status, r = post_image(base + "/v1/images", upload, {"label": "smoke"}, {"Authorization": f"Bearer {key}"})
    if status != 201 or not r.get("created"):
        raise SmokeError(f"POST /v1/images (container user writing /index): HTTP {status}: {r}")
    new_id = r["image"]["id"]
    status, s = post_image(base + "/v1/search", upload, {"k": "1"})
    if status != 200 or not s["results"] or s["results"][0]["id"] != new_id:
        raise SmokeError(f"search by the uploaded image should return id {new_id} first: HTTP {status}: {s}")
    log(f"write OK: upload id {new_id} indexed (index size {r['index_size']}) and found by search")
    return new_id


def check_image_url(base: str, hit: dict, images: Path) -> None:
    status, raw, headers = http("GET", base + hit["image_url"])
    want = (images / hit["path"]).read_bytes()
    if status != 200 or raw != want:
        raise SmokeError(f"GET {hit['image_url']}: HTTP {status}, {len(raw)} bytes (expected the {len(want)} "
                         f"bytes of {hit['path']})")
    log(f"image URL OK: {hit['image_url']} -> {headers.get('content-type')}, {len(raw)} bytes")


def check_inside(cid: str) -> None:
    p = run(["podman", "healthcheck", "run", cid], check=False)
    out = (p.stdout + p.stderr).strip()
    if p.returncode != 0:
        raise SmokeError(f"podman healthcheck run: exit {p.returncode}: {out}")
    health = run(["podman", "inspect", "--format", "{{.State.Health.Status}}", cid], check=False,
                 quiet=True).stdout.strip()
    if health and health != "healthy":
        raise SmokeError(f"container health is {health!r} after a passing health check")
    log(f"HEALTHCHECK OK: {out or 'healthy'} (State.Health.Status={health or 'n/a'})")
    uid = run(["podman", "exec", cid, "id", "-u"]).stdout.strip()
    if not uid.isdigit() or int(uid) == 0:
        raise SmokeError(f"the service runs as uid {uid!r}: expected a non-root user")
    p = run(["podman", "exec", cid, "python", "-c",
             "import importlib.util as u, sys; sys.exit(0 if u.find_spec('torch') is None else 1)"], check=False)
    if p.returncode != 0:
        raise SmokeError("torch is importable in the serving image: it should run on ONNX Runtime alone")
    log(f"non-root OK: uid {uid}; torch absent from the image")


def stop_gracefully(cid: str, grace: int) -> None:
    t0 = time.perf_counter()
    run(["podman", "stop", "-t", str(grace), cid], timeout=grace + 60)
    took = time.perf_counter() - t0
    code = run(["podman", "inspect", "--format", "{{.State.ExitCode}}", cid], quiet=True).stdout.strip()
    if code != "0":
        raise SmokeError(f"the service did not shut down cleanly on SIGTERM (exit status {code}, "
                         f"{took:.1f} s; 137 means it was killed after {grace} s); log:\n{container_logs(cid)}")
    log(f"graceful stop OK: exit status 0 after SIGTERM in {took:.1f} s; the log ends:")
    for line in container_logs(cid).splitlines()[-4:]:
        log(f"  | {line}")


def check_index_on_host(index: Path, venv: Path, want_size: int, served_generation: int) -> None:
    p = run([str(venv / "bin" / "lookalike"), "index", "info", "--json", str(index)], timeout=120)
    info = json.loads(p.stdout)
    size, pending = info.get("ntotal"), info.get("pending_changes")
    if size != want_size:
        raise SmokeError(f"after the container stopped the index on the host has {size} vectors, expected "
                         f"{want_size} (the upload must persist in the mounted volume): {info}")
    if pending != 0 or info.get("generation", -1) <= served_generation:
        raise SmokeError(f"after a graceful stop the index should have published a generation with every "
                         f"change (generation > {served_generation}, nothing pending): {info}")
    log(f"persistence OK: host index has {size} vectors, generation {info.get('generation')}, "
        "nothing pending after the stop")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=REPO / ".venv", help="host venv with lookalike[torch] (default .venv)")
    ap.add_argument("--tag", default=os.environ.get("LOOKALIKE_SMOKE_IMAGE", "localhost/lookalike:smoke"))
    ap.add_argument("--grace", type=int, default=30, help="seconds podman stop waits before SIGKILL")
    ap.add_argument("--keep", action="store_true", help="keep the temporary model/index directory")
    args = ap.parse_args(argv)
    conf = CTR_DIR / "containers.conf"
    if "CONTAINERS_CONF" not in os.environ and conf.is_file():
        os.environ["CONTAINERS_CONF"] = str(conf)

    timer = Timer()
    t_all = time.perf_counter()
    cid = None
    work = Path(tempfile.mkdtemp(prefix="lookalike-smoke-"))
    try:
        preflight(args.venv)
        with timer("build"):
            build_image(args.tag)
        size_mb = int(run(["podman", "image", "inspect", "--format", "{{.Size}}", args.tag], quiet=True).stdout) / 1e6
        log(f"image {args.tag}: {size_mb:.0f} MB")
        user = image_user(args.tag)
        with timer("model+index (host)"):
            model, images, index, fp = make_assets(work, args.venv)
        n_indexed = sum(1 for _ in images.rglob("*.png"))
        # The container user must read the model and write the index (see the module docstring).
        # save_model writes its files 0600 (mkstemp), so make the model world-readable.
        for p in [model, *model.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        uid, _, gid = user.partition(":")
        run(["chown", "-R", f"{uid}:{gid or uid}", str(index)], quiet=True)

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        key = secrets.token_urlsafe(24)
        with timer("start to ready"):
            cid = run([
                "podman", "run", "-d", "--pull=never",
                "--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges",
                "-p", f"127.0.0.1:{port}:8000",
                "-v", f"{model}:/model:ro", "-v", f"{index}:/index", "-v", f"{images}:{images}:ro",
                "-e", f"LOOKALIKE_API_KEY={key}",
                args.tag,
            ]).stdout.strip()
            log(f"container {cid[:12]} on {base}")
            ready = wait_ready(base, cid)
        with timer("requests"):
            r = check_search(base, images / "class1" / "2.png", images, fp, n_indexed)
            check_image_url(base, r["results"][1], images)
            check_writes(base, work / "upload.png", key)
        with timer("in-container checks"):
            check_inside(cid)
        with timer("stop"):
            stop_gracefully(cid, args.grace)
        check_index_on_host(index, args.venv, n_indexed + 1, ready["generation"])
        run(["podman", "rm", cid], quiet=True)
        cid = None
    except SmokeError as exc:
        print(f"container_smoke: FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if cid is not None:  # only the container this run started, by id
            run(["podman", "rm", "-f", "-t", "5", cid], check=False, quiet=True)
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    timer.t["total"] = time.perf_counter() - t_all
    log("PASSED; timings (s): " + json.dumps({k: round(v, 1) for k, v in timer.t.items()})
        + f"; image {size_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
