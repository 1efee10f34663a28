#!/usr/bin/env bash
# Install the serving-benchmark peers and load generator, outside the repo.
#
# Why: serving benchmarks compare pdserve's HTTP server with `transformers serve
# --continuous-batching` and `llama-server` (built by build_llamacpp.sh), driven by aiperf.
# This script adds `transformers[serving]` (FastAPI + uvicorn + openai) to the peers venv and
# makes a separate aiperf venv. Neither may pull another torch: each install is dry-run first
# and refused if it would bring torch, triton or a CUDA (nvidia-*) package other than
# nvidia-ml-py (a pure-Python NVML binding aiperf imports; harmless without a GPU).
#
# Idempotent: each step is skipped when its result is already installed.
# Usage: [PEERS_DIR=dir] [PYTHON=python3] benchmarks/peers/setup_serving_peers.sh
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS_DIR="${PEERS_DIR:-$REPO_DIR/../peers}"
mkdir -p "$PEERS_DIR"
PEERS_DIR="$(cd "$PEERS_DIR" && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"   # same pin as build_llamacpp.sh: the local CPU wheel
AIPERF_VERSION="${AIPERF_VERSION:-0.13.0}"

VENV="$PEERS_DIR/venv"                 # shared with the GGUF converter (build_llamacpp.sh)
AIPERF_VENV="$PEERS_DIR/aiperf-venv"

# Dry-run `pip install ARGS...` in a venv; fail if it would install torch or CUDA packages.
check_no_torch() {
    local venv="$1"
    shift
    local plan
    plan="$("$venv/bin/python" -m pip install --dry-run "$@" 2>&1)" || {
        echo "$plan" >&2
        return 1
    }
    local would
    would="$(grep '^Would install' <<<"$plan" | tr ' ' '\n' | tail -n +3 || true)"
    local bad
    bad="$(grep -iE '^(torch|triton|nvidia)' <<<"$would" | grep -viE '^nvidia-ml-py-' || true)"
    if [[ -n "$bad" ]]; then
        echo "refusing: pip install $* into $venv would install:" >&2
        echo "$bad" >&2
        return 1
    fi
}

ensure_peers_venv() {
    if [[ ! -x "$VENV/bin/python" ]]; then
        "$PYTHON" -m venv "$VENV"
    fi
    # torch first and pinned, so nothing later resolves another (CUDA) torch.
    if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
        "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
    fi
}

install_transformers_serving() {
    if "$VENV/bin/python" -c "import transformers, fastapi, uvicorn, openai" 2>/dev/null; then
        echo "transformers[serving] already in $VENV"
        return
    fi
    check_no_torch "$VENV" "transformers[serving]" "torch==$TORCH_VERSION"
    "$VENV/bin/python" -m pip install --quiet "transformers[serving]" "torch==$TORCH_VERSION"
}

install_aiperf() {
    if [[ ! -x "$AIPERF_VENV/bin/python" ]]; then
        "$PYTHON" -m venv "$AIPERF_VENV"
    fi
    if [[ "$("$AIPERF_VENV/bin/python" -m pip show aiperf 2>/dev/null | sed -n 's/^Version: //p')" == "$AIPERF_VERSION" ]]; then
        echo "aiperf $AIPERF_VERSION already in $AIPERF_VENV"
        return
    fi
    check_no_torch "$AIPERF_VENV" "aiperf==$AIPERF_VERSION"
    "$AIPERF_VENV/bin/python" -m pip install --quiet "aiperf==$AIPERF_VERSION"
}

report() {
    "$VENV/bin/python" -c "import torch, transformers; print('peers venv       :', '$VENV', 'torch', torch.__version__, 'transformers', transformers.__version__)"
    "$VENV/bin/transformers" serve --help >/dev/null
    echo "transformers serve: $VENV/bin/transformers serve --continuous-batching ..."
    echo "aiperf           : $AIPERF_VENV/bin/aiperf ($("$AIPERF_VENV/bin/aiperf" --version 2>&1 | tail -1))"
    if [[ -x "$PEERS_DIR/llama.cpp-build/bin/llama-server" ]]; then
        echo "llama-server     : $PEERS_DIR/llama.cpp-build/bin/llama-server"
    else
        echo "llama-server     : not built yet (run benchmarks/peers/build_llamacpp.sh)"
    fi
}

ensure_peers_venv
install_transformers_serving
install_aiperf
report
