# syntax=docker/dockerfile:1
# pdserve's image: the router and the workers (`pdserve router`, `pdserve worker`) and
# `pdserve serve`, on CPU by default. Build and run: docs/deploy.md.
#
#   docker build -t pdserve:0.1.0 .
#
# GPU nodes: the same file with a CUDA torch wheel (those bundle the CUDA libraries, so the
# Python base image stays; the node needs the NVIDIA driver and container toolkit):
#
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       --build-arg WITH_BUILTIN_MODEL=0 -t pdserve:0.1.0-cu128 .
#
# Pin BASE_IMAGE by digest (python:3.11-slim-bookworm@sha256:...) for reproducible builds.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# torch comes from PyTorch's CPU wheel index, pinned like `make setup` pins it and installed
# before pdserve: PyPI's Linux torch wheel is the multi-GB CUDA build, and pdserve's own
# `torch==2.13.0` is then already met, so pip never looks for another.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# 1: the built-in model is created here, once (see below); 0 for images that serve a mounted
# checkpoint (`--model /models/...`).
ARG WITH_BUILTIN_MODEL=1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/pdserve/venv \
    PATH=/opt/pdserve/venv/bin:$PATH \
    PDSERVE_CACHE_DIR=/opt/pdserve/cache

# A C compiler at run time: pdserve builds its CPU kernels with -march=native on first use,
# on the node that runs them (pdserve/model/kernels), so they cannot be built here. Debian's
# packages are not version-pinned: the base image tag (or digest) fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 pdserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin pdserve

RUN python -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"

WORKDIR /opt/pdserve/src
COPY pyproject.toml README.md ./
COPY pdserve ./pdserve
WORKDIR /opt/pdserve
RUN pip install --no-cache-dir ./src && rm -rf /opt/pdserve/src

# The built-in model is made at build time, not at first start: router and workers must hold
# byte-identical tokenizer and weights, and its tokenizer is trained on this image's Python
# standard library (pdserve/model/builtin.py), so one copy made here is what every pod of the
# image loads; pods start without minutes of CPU each. Its files stay root-owned (read-only
# to the server); only the kernels folder is the server's to write.
RUN if [ "$WITH_BUILTIN_MODEL" = 1 ]; then pdserve model create; fi \
    && install -d -o 10001 -g 10001 -m 0755 "$PDSERVE_CACHE_DIR/kernels"

USER 10001:10001
# 8000: HTTP (OpenAI API, /health, /ready, /metrics); 5557: the router's ZeroMQ socket.
EXPOSE 8000 5557
ENTRYPOINT ["pdserve"]
CMD ["serve", "--host", "0.0.0.0"]
