#!/usr/bin/env bash
# The whole GPU measurement in at most four device calls of at most 8 minutes each.
#
#   here, once (needs the package registry):  bash scripts/gpu_session.sh fetch
#       downloads the wheels the GPU image lacks (open_clip_torch, ftfy, wcwidth) into .whl/
#   on the device, one call per step, with .whl carried, in this order:
#       bash scripts/gpu_session.sh selfcheck  # crossgap selfcheck --device cuda (demo model, ViT-B-32)
#       bash scripts/gpu_session.sh tests      # the cuda tier, then the interpreter tier
#       bash scripts/gpu_session.sh bench      # GPU benchmarks, one JSON per file
#   back here:
#       python scripts/bench_table.py gpu-out/bench-*.json   # rows for the README's table
#
# Every step writes its results under $OUT (or ./gpu-out) as it goes: each selfcheck JSON is
# rewritten after every stage, each test file and benchmark file gets its own log / JSON, and
# every command runs under a timeout that ends the step inside 8 minutes, so a step that is cut
# short keeps what it finished. The GPU image has its own torch / triton (not this project's
# pins); the numbers carry the versions it prints.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
budget=470 # seconds per step: under 8 minutes with the start-up

case "${1:-}" in
fetch)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl \
        open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13
    exit
    ;;
selfcheck | tests | bench) ;;
*)
    echo "usage: $0 fetch|selfcheck|tests|bench" >&2
    exit 2
    ;;
esac

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton, open_clip; print('torch', torch.__version__, 'triton', triton.__version__, 'open_clip', open_clip.__version__)" | tee -a "$out/device.txt"
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }

run() { # run NAME SECONDS COMMAND...: log to $out/NAME.log, never past the step's budget
    local name=$1 limit=$2
    shift 2
    local cap
    cap=$(left)
    ((limit > cap)) && limit=$cap
    if ((limit < 20)); then
        echo "skipped $name: the step's time is spent" | tee "$out/$name.log"
        return
    fi
    echo "== $name (up to ${limit}s)"
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
}

case "$1" in
selfcheck)
    run selfcheck-demo 200 python3 -m crossgap_fast selfcheck --device cuda --json "$out/selfcheck-demo.json"
    run selfcheck-vitb32 270 python3 -m crossgap_fast selfcheck --device cuda --model ViT-B-32 \
        --pretrained random --json "$out/selfcheck-vitb32.json"
    ;;
tests)
    run tests-cuda 300 python3 -m pytest -q -m cuda tests --benchmark-disable -p no:cacheprovider
    run tests-interpreter 170 python3 -m pytest -q -m interpreter tests --benchmark-disable -p no:cacheprovider
    ;;
bench)
    # the end-to-end GPU inversions (cuda-marked), then every kernel micro-benchmark
    run bench-inversion 250 python3 -m pytest -q benchmarks/bench_inversion.py -m cuda --benchmark-only \
        -p no:cacheprovider --benchmark-json="$out/bench-inversion.json"
    run bench-kernels 210 python3 -m pytest -q benchmarks/bench_kernels.py --benchmark-only \
        -p no:cacheprovider --benchmark-json="$out/bench-kernels.json"
    ;;
esac
