#!/usr/bin/env bash
# The GPU benchmark (benchmarks/gpu.py) on a GPU machine with no network and no Ray: installs the wheels that
# `make gpu-wheels` put in .whl/ (DeepSpeed, the VQ-GAN's vector-quantize-pytorch and what they need beyond the
# machine's own packages) into /tmp/site, then runs the benchmark with the checkout on the path. At most
# 6 minutes in all. Without a GPU it says so in one line and exits 0. Arguments go to gpu.py.
#
#   bash benchmarks/gpu.sh                      # prints gpu.py's JSON result line last
#   bash benchmarks/gpu.sh --batch-size 32
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
SITE="${GPU_BENCH_SITE:-/tmp/site}"
BUDGET_S="${GPU_BENCH_TIMEOUT_S:-330}"  # the benchmark's own share of the 6 minutes; the install takes seconds

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu benchmark: no NVIDIA GPU here (nvidia-smi missing or failing); nothing measured"
    exit 0
fi

shopt -s nullglob
wheels=("$ROOT"/.whl/*.whl)
if ((${#wheels[@]})); then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${wheels[@]}"
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu benchmark: no .whl/ (make gpu-wheels): DeepSpeed and vector-quantize-pytorch must be installed" >&2
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

cd "$ROOT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec timeout --signal=INT --kill-after=15 "$BUDGET_S" "$PYTHON" benchmarks/gpu.py "$@"
