#!/usr/bin/env bash
# Build llama.cpp's C++ tools and a converter venv as a benchmark peer, outside the repo.
#
# Why: docs/benchmarks.md compares pdserve with llama.cpp on the same weights and machine.
# llama.cpp's source comes from the llama-cpp-python sdist on PyPI (it vendors llama.cpp),
# because PyPI is the only source registry these machines reach.
#
# Idempotent: each step is skipped when its output exists; cmake rebuilds only what changed.
# Usage: [PEERS_DIR=dir] [JOBS=2] [LLAMA_ISA=native|avx2] benchmarks/peers/build_llamacpp.sh
#
# LLAMA_ISA=avx2 builds into llama.cpp-build-avx2 with AVX-512 off (AVX2/FMA/F16C only): the
# peer an AVX2-only CPU would run, for a side-by-side with pdserve's AVX2 kernels on any
# host. Point the benchmarks at it with PDSERVE_LLAMACPP_BUILD=$PEERS_DIR/llama.cpp-build-avx2.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS_DIR="${PEERS_DIR:-$REPO_DIR/../peers}"
mkdir -p "$PEERS_DIR"
PEERS_DIR="$(cd "$PEERS_DIR" && pwd)"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python3}"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
TORCH_VERSION="2.13.0"   # the CPU wheel on the machines; anything looser may pull a CUDA build
TARGETS=(llama-bench llama-batched-bench llama-server llama-cli)

SRC_DIR="$PEERS_DIR/src"
TREE="$SRC_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
LLAMA_DIR="$TREE/vendor/llama.cpp"
LLAMA_ISA="${LLAMA_ISA:-native}"
case "$LLAMA_ISA" in
    native) BUILD_DIR="$PEERS_DIR/llama.cpp-build"; ISA_FLAGS=(-DGGML_NATIVE=ON) ;;
    avx2) BUILD_DIR="$PEERS_DIR/llama.cpp-build-avx2"
          ISA_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                     -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF
                     -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF) ;;
    *) echo "LLAMA_ISA must be native or avx2, not $LLAMA_ISA" >&2; exit 2 ;;
esac
VENV="$PEERS_DIR/venv"

fetch_source() {
    local tarball="$SRC_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
    mkdir -p "$SRC_DIR"
    if [[ ! -f "$tarball" ]]; then
        "$PYTHON" -m pip download "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" \
            --no-binary :all: --no-deps -d "$SRC_DIR"
    fi
    if [[ ! -f "$LLAMA_DIR/CMakeLists.txt" ]]; then
        tar -xzf "$tarball" -C "$SRC_DIR"
    fi
}

build_tools() {
    cmake -S "$LLAMA_DIR" -B "$BUILD_DIR" -G Ninja \
        "${ISA_FLAGS[@]}" -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
    cmake --build "$BUILD_DIR" -j "$JOBS" --target "${TARGETS[@]}"
}

make_converter_venv() {
    if [[ ! -x "$VENV/bin/python" ]]; then
        "$PYTHON" -m venv "$VENV"
    fi
    # torch first and pinned, so nothing later resolves another (CUDA) torch.
    "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
    "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" \
        gguf sentencepiece numpy transformers safetensors protobuf
}

report() {
    echo "llama.cpp source : $LLAMA_DIR"
    echo "binaries         : $BUILD_DIR/bin"
    for target in "${TARGETS[@]}"; do
        ls -l "$BUILD_DIR/bin/$target"
    done
    echo "converter        : $VENV/bin/python $LLAMA_DIR/convert_hf_to_gguf.py MODEL_DIR --outtype f32"
}

fetch_source
build_tools
make_converter_venv
report
