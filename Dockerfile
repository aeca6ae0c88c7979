# lookalike container images (Debian bookworm, apt's python3 3.11, a venv in /opt/venv).
#
# Targets:
#   serve (the default, last stage)  the REST service and search page on ONNX Runtime + FAISS +
#                                    FastAPI, without torch. The model is mounted read-only at
#                                    /model (it must hold model.onnx: `lookalike export --onnx`),
#                                    the index at /index (written by POST/DELETE /v1/images).
#   train                            the full `lookalike` command with torch/torchvision for
#                                    training, export and indexing; CUDA via TORCH_VARIANT.
#
#   docker build -t lookalike:serve .          # podman: add --format docker (keeps HEALTHCHECK)
#   docker run -p 127.0.0.1:8000:8000 -v "$PWD/runs/demo/model:/model:ro" \
#     -v "$PWD/runs/demo/index:/index" -e LOOKALIKE_WRITES_ENABLED=false lookalike:serve
#   docker build --target train --build-arg TORCH_VARIANT=cpu -t lookalike:train .
#   docker run --gpus all -v "$PWD/data:/data:ro" -v "$PWD/runs:/runs" lookalike:train train ...
#
# The service runs as UID:GID 10001:10001. With writes enabled /index must be writable by that
# user (`chown -R 10001:10001 runs/demo/index` or `--user "$(id -u):$(id -g)"`); read-only serving
# (LOOKALIKE_WRITES_ENABLED=false) works from a `:ro` index mount.
# Image URLs (GET /v1/images/{id}) read the indexed folder's files: mount it read-only and point
# LOOKALIKE_IMAGES_ROOT at the mount (e.g. `-v "$PWD/data/images:/images:ro" -e LOOKALIKE_IMAGES_ROOT=/images`).
# Every service setting is an environment variable LOOKALIKE_<NAME> (see service/settings.py).

# ---- base: the runtime shared by both targets ----------------------------------------------------
FROM debian:bookworm-slim AS base
ENV LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# Debian's security updates replace package versions, so apt packages are not pinned (the base
# image tag pins the release).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 lookalike \
 && useradd --system --uid 10001 --gid lookalike --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin lookalike

# ---- venv: the base (torch-free) dependencies; rebuilt only when pyproject.toml changes ----------
FROM base AS venv
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "$VIRTUAL_ENV"
WORKDIR /src
COPY pyproject.toml ./
# The dependency list is read from pyproject.toml, so the image cannot drift from it.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt

# ---- wheel: the lookalike package itself (no dependencies) ---------------------------------------
FROM venv AS wheel
COPY README.md pyproject.toml ./
COPY lookalike/ lookalike/
COPY models/ models/
COPY index/ index/
COPY service/ service/
COPY training/ training/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# ---- train: torch + torchvision, for training / export / indexing (CPU or CUDA) ------------------
FROM venv AS train
# Which torch build: "pypi" (default; PyPI's torch, which on x86_64 Linux bundles its CUDA libraries
# and also runs on CPU), or a variant of download.pytorch.org/whl: "cpu" (much smaller, CPU only) or
# a CUDA version that the torch release is built for, e.g. "cu128" or "cu130". TORCH_INDEX_URL, when
# set, is used instead. CUDA needs only the host's NVIDIA driver and the container toolkit
# (`docker run --gpus all ...`, podman `--device nvidia.com/gpu=all`).
ARG TORCH_VARIANT=pypi
ARG TORCH_INDEX_URL=""
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# torch/torchvision first (the big, rarely changing layer), with the versions pyproject.toml allows;
# then the rest of the `torch` extra from PyPI.
RUN url="$TORCH_INDEX_URL"; \
    if [ -z "$url" ]; then \
      if [ "$TORCH_VARIANT" = "pypi" ]; then url=https://pypi.org/simple; \
      else url="https://download.pytorch.org/whl/$TORCH_VARIANT"; fi; \
    fi; \
    python -c "import re, tomllib; reqs = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['torch']; print('\n'.join(r for r in reqs if re.match(r'(torch|torchvision)\\b', r)))" \
      > /tmp/torch.txt \
 && python -c "import re, tomllib; reqs = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['torch']; print('\n'.join(r for r in reqs if not re.match(r'(torch|torchvision)\\b', r)))" \
      > /tmp/torch-extra.txt \
 && echo "torch from $url: $(tr '\n' ' ' < /tmp/torch.txt)" \
 && pip install --no-cache-dir --index-url "$url" -r /tmp/torch.txt \
 && pip install --no-cache-dir -r /tmp/torch-extra.txt
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-cache-dir --no-deps /tmp/dist/*.whl \
 && rm -rf /tmp/dist /tmp/*.txt /src \
 && mkdir -p /data /runs /home/lookalike \
 && chown lookalike:lookalike /runs /home/lookalike
# Data read-only at /data, runs (checkpoints, models, indexes) at /runs; HOME holds the torch and
# matplotlib caches (pretrained torchvision weights land in $HOME/.cache/torch: mount it to keep them).
ENV HOME=/home/lookalike
WORKDIR /runs
USER 10001:10001
ENTRYPOINT ["lookalike"]
CMD ["--help"]

# ---- serve: the service, no torch (default target) -----------------------------------------------
FROM base AS serve
COPY --from=venv /opt/venv /opt/venv
COPY --from=wheel /dist/ /tmp/dist/
# pip and setuptools are only needed to install: drop them from the serving image.
RUN pip install --no-cache-dir --no-deps /tmp/dist/*.whl \
 && pip uninstall -y --no-cache-dir pip setuptools >/dev/null \
 && rm -rf /tmp/dist \
 && mkdir -p /model /index \
 && chown lookalike:lookalike /index
ENV LOOKALIKE_MODEL_DIR=/model \
    LOOKALIKE_INDEX_DIR=/index \
    LOOKALIKE_BACKEND=onnx \
    LOOKALIKE_HOST=0.0.0.0 \
    LOOKALIKE_PORT=8000
VOLUME ["/model", "/index"]
USER 10001:10001
EXPOSE 8000
# Liveness through the service itself (no curl in the image); urlopen raises on any non-2xx.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LOOKALIKE_PORT', '8000'), timeout=4)"]
# Exec form: lookalike (uvicorn) is PID 1 and gets SIGTERM itself; uvicorn then stops accepting,
# finishes in-flight requests, and the lifespan closes the index (publishing pending writes).
STOPSIGNAL SIGTERM
ENTRYPOINT ["lookalike", "serve"]
