#!/usr/bin/env bash
# Build llama.cpp (through llama-cpp-python, which vendors its source) into its own virtual
# environment, for this machine's instruction set: a same-machine peer for one-request decoding.
#   benchmarks/install_llamacpp.sh [VENV]    (default: ~/.cache/ladle/llamacpp-venv; ~10 min on 2 cores)
set -euo pipefail
VENV=${1:-$HOME/.cache/ladle/llamacpp-venv}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
CMAKE_ARGS="-DGGML_NATIVE=ON" "$VENV/bin/python" -m pip --disable-pip-version-check -q install llama-cpp-python
