#!/usr/bin/env bash
# The GPU measurements issue 3 asks for, made cheap for a session that is lent a GPU.
#
#   here, once (needs the package registry):  bash scripts/gpu_session.sh fetch
#       downloads the wheels the GPU image lacks (open_clip_torch and ftfy) into .whl/
#   on the device, one call per step, with .whl carried:
#       bash scripts/gpu_session.sh tests    # the cuda tier (+ the interpreter tier there)
#       bash scripts/gpu_session.sh bench    # GPU benchmarks -> bench.json, table.md
#
# The GPU image has its own torch / triton (not this project's pins), so the numbers are
# recorded with the versions it prints. Logs and results go to $OUT (or ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"

case "${1:-}" in
fetch)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl \
        open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13
    exit
    ;;
tests | bench) ;;
*)
    echo "usage: $0 fetch|tests|bench" >&2
    exit 2
    ;;
esac

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton, open_clip; print('torch', torch.__version__, 'triton', triton.__version__, 'open_clip', open_clip.__version__)" | tee -a "$out/device.txt"

if [ "$1" = tests ]; then
    python3 -m pytest -q -m "cuda or interpreter" tests --benchmark-disable 2>&1 | tee "$out/tests.log"
else
    python3 -m pytest -q benchmarks -k "gpu or bench_kernels" --benchmark-only \
        --benchmark-json="$out/bench.json" 2>&1 | tee "$out/bench.log"
    python3 scripts/bench_table.py "$out/bench.json" | tee "$out/table.md"
fi
