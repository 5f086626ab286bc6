#!/usr/bin/env bash
# The essential GPU measurement in ONE device call of at most 8 minutes, on the GPU image's own
# torch and triton plus only the wheels this project adds (open_clip_torch, ftfy, wcwidth).
#
#   here, once (needs the package registry):   bash scripts/gpu_session.sh fetch
#       downloads those wheels into .whl/ (ignored by git; the device call carries it)
#   on the device, with .whl carried:          bash scripts/gpu_session.sh
#       1. the environment (GPU, driver, torch, triton, open_clip, numpy)
#       2. crossgap selfcheck --device cuda on the demo model (every stage)
#       3. steady-state OTI and OVI at N = 4096 on ViT-B-32 (random weights; the default path;
#          the first call's compile and capture reported apart)
#       4. crossgap selfcheck --device cuda on ViT-B-32 (eager fp32 and the default path)
#       5. the steady state of 3 on ViT-L-14
#       6. the kernel micro-benchmarks, one op at a time
#   optionally, a second call:                 bash scripts/gpu_session.sh tests
#       the cuda test tier, then the interpreter tier
#   back here:
#       python scripts/bench_table.py gpu-out/steady.json gpu-out/kernels.json   # README rows
#   on a machine without a GPU:                bash scripts/gpu_session.sh smoke
#       the same steps on the CPU at the smallest sizes (checks the script, not the GPU)
#
# Every step writes under $OUT (or ./gpu-out) as it goes, into at most 8 files (the device
# tool returns no more): session.log (everything printed), selfcheck-demo.json and
# selfcheck-vitb32.json (rewritten after every stage), steady.json and kernels.json (rewritten
# after every case). Each step runs under a timeout that keeps the whole call inside its
# budget, so a call cut short keeps what it finished, most important first. The inductor and
# Triton caches are shared by the steps: a graph compiled by one is not compiled again.
set -uo pipefail
self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$self")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
mode=${1:-session}
# seconds for the steps: with the wheels' install, the environment and each step's grace period
# the call stays under 8 minutes (the machine's start-up is not part of the call)
budget=${BUDGET:-420}

merge_json() { # merge_json NEW TARGET: append NEW's benchmarks to TARGET (written atomically)
    python3 - "$1" "$2" <<'PY'
import json, os, sys
new, path = json.load(open(sys.argv[1])), sys.argv[2]
merged = json.load(open(path)) if os.path.exists(path) else {k: v for k, v in new.items() if k != "benchmarks"}
merged.setdefault("benchmarks", []).extend(new.get("benchmarks", []))
with open(path + ".tmp", "w") as fh:
    json.dump(merged, fh, indent=1)
os.replace(path + ".tmp", path)
PY
}

case "$mode" in
fetch)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl \
        open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13
    exit
    ;;
_bench) # _bench FILE SELECTION TARGET: one pytest-benchmark run, merged into $out/TARGET
    # merged even when pytest fails or is interrupted: the cases it finished are in its JSON
    tmp=/tmp/crossgap-bench-$$.json
    rm -f "$tmp"
    python3 -m pytest -q "$2" -k "$3" --benchmark-only -p no:cacheprovider --benchmark-json="$tmp"
    rc=$?
    if [[ -s $tmp ]]; then merge_json "$tmp" "$out/$4"; fi
    exit $rc
    ;;
session | tests | smoke) ;;
*)
    echo "usage: $0 [session|tests|smoke|fetch]" >&2
    exit 2
    ;;
esac

main() {
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/crossgap-inductor TRITON_CACHE_DIR=/tmp/crossgap-triton
export OUT=$out
device=cuda
[[ $mode == smoke ]] && device=cpu
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }

run() { # run NAME SECONDS COMMAND...: never past the call's budget; logged in session.log
    local name=$1 limit=$2
    shift 2
    local cap
    cap=$(($(left) - 10)) # timeout's grace period (--kill-after) counts too
    ((limit > cap)) && limit=$cap
    if ((limit < 20)); then
        echo "== $name: skipped, the call's time is spent"
        return
    fi
    echo "== $name (up to ${limit}s, $(left)s left in the call)"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@"
    echo "== $name: exit $? after $((SECONDS - t0))s"
}

bench() { # bench NAME SECONDS FILE SELECTION TARGET
    run "$1" "$2" bash "$self" _bench "$3" "$4" "$5"
}

steady() { # steady MODEL METHOD SECONDS: the default path at N = 4096, into steady.json
    local select="test_gpu_steady_state and $1 and $2"
    [[ $mode == smoke ]] && select="test_cpu_inversion and $2 and fast] and not bidir"
    bench "steady-$1-$2" "$3" benchmarks/bench_inversion.py "$select" steady.json
}

echo "== environment ($mode)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch, triton, open_clip, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'open_clip', open_clip.__version__, 'numpy', numpy.__version__, 'cuda', torch.version.cuda)"

if [[ $mode == tests ]]; then
    run tests-cuda 300 python3 -m pytest -q -m cuda tests --benchmark-disable -p no:cacheprovider
    run tests-interpreter 150 python3 -m pytest -q -m interpreter tests --benchmark-disable -p no:cacheprovider
    return
fi

default_stage=compile+graph+kernels-bf16
[[ $mode == smoke ]] && default_stage=eager-bf16
run selfcheck-demo 150 python3 -m crossgap_fast selfcheck --device "$device" --json "$out/selfcheck-demo.json"
steady ViT-B-32 oti 70
steady ViT-B-32 ovi 70
run selfcheck-vitb32 90 python3 -m crossgap_fast selfcheck --device "$device" --model ViT-B-32 --pretrained random \
    --no-throughput --stages "eager-fp32,$default_stage" --json "$out/selfcheck-vitb32.json"
steady ViT-L-14 oti 80
steady ViT-L-14 ovi 90
for op in adamw cosine insert expand prefix_attention_cuda; do # one run each: a cut keeps the others
    [[ $mode == smoke && $op != cosine ]] && continue
    bench "kernels-$op" 40 benchmarks/bench_kernels.py "$op" kernels.json
done
echo "== done in $((SECONDS - start))s; files in $out: $(ls "$out" | tr '\n' ' ')"
}

# a pipeline, not exec > >(tee): the call returns only once session.log is complete
main 2>&1 | tee -a "$out/session.log"
