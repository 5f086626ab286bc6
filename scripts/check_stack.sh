#!/usr/bin/env bash
# Does the package work on another torch / triton stack? Builds a fresh virtual environment with
# the given torch (its triton and a matching torchvision come with it), installs the package
# WITHOUT its pins plus the test dependencies, and runs, each step with its own log:
#   cpu          the CPU suite:                python -m pytest -q --benchmark-disable
#   interp-shim  the interpreter tier through the tests' shim:   pytest -m interpreter
#   interp-env   the same in Triton's own interpreter mode:      TRITON_INTERPRET=1 pytest -m interpreter
#   sm90         every kernel compiled to a cubin for sm_90 (no GPU needed), with an empty
#                Triton cache so that nothing compiled by another stack is reused
#
#   bash scripts/check_stack.sh                   # torch==2.11.0
#   bash scripts/check_stack.sh torch==2.15.0     # or a bare version: 2.15.0
#
# Not part of CI: the CUDA wheels are several GB. Environment knobs:
#   VENV=DIR       where the environment goes (default $TMPDIR/crossgap-stack/torch-VERSION);
#                  an existing one is reused when REUSE=1 (nothing installed then)
#   LOGDIR=DIR     the logs (default stack-logs/torch-VERSION): one per step, versions.txt,
#                  install.log, summary.txt
#   EXTRAS="dev"   the optional dependency groups to install (CI uses "dev webdataset ray")
#   PYTHON=python3 the interpreter the environment is made from
#   STEPS="cpu interp-shim interp-env sm90"   the steps to run
# The exit status is 0 only when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

spec=${1:-torch==2.11.0}
[[ $spec == torch* ]] || spec="torch==$spec"
version=${spec#torch==}
[[ $version == "$spec" ]] && version=$(echo "$spec" | tr -c 'A-Za-z0-9.\n' '_')
venv=${VENV:-${TMPDIR:-/tmp}/crossgap-stack/torch-$version}
logs=${LOGDIR:-stack-logs/torch-$version}
extras=${EXTRAS:-dev}
steps=${STEPS:-cpu interp-shim interp-env sm90}
mkdir -p "$logs"
logs=$(cd "$logs" && pwd)

# This machine's pip configuration (/etc/xdg/pip/pip.conf) applies a constraints file that caps
# torch at 2.14.1 (and torchvision at 0.29.1), the releases kept on its disk. For a newer torch
# the configuration is skipped for this script's pip calls only (PIP_CONFIG_FILE=/dev/null: the
# packages then come from the default index, without the local wheel folders); the file itself
# stays as it is. PIP_CAP overrides the capped version, BYPASS_PIP_CAP=1 forces the bypass.
cap=${PIP_CAP:-2.14.1}
bypass=${BYPASS_PIP_CAP:-0}
if [[ $spec == torch==* && $version != "$cap" ]] &&
    [[ $(printf '%s\n%s\n' "$cap" "$version" | sort -V | tail -n1) == "$version" ]]; then
    bypass=1
fi
pip_env=()
((bypass)) && pip_env=(env PIP_CONFIG_FILE=/dev/null)

py="$venv/bin/python"
pip() { "${pip_env[@]}" "$py" -m pip "$@"; }

# The project's dependencies and the chosen extras by name only (extras and markers kept): the
# pins in pyproject.toml name one stack, this script checks another. torch, torchvision and
# triton are left out: they come with the torch asked for.
unpinned_deps() {
    "$py" - "$extras" <<'EOF'
import re, sys

try:
    import tomllib
except ImportError:  # Python 3.10: the copy pip carries
    from pip._vendor import tomli as tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = list(project["dependencies"])
for extra in sys.argv[1].split():
    reqs += project["optional-dependencies"][extra]
for req in reqs:
    m = re.match(r"\s*([A-Za-z0-9._-]+(?:\[[^\]]*\])?)[^;]*(;.*)?$", req)
    name, marker = m.group(1), m.group(2) or ""
    if re.sub(r"\[.*", "", name).lower() not in ("torch", "torchvision", "triton"):
        print(name + marker)
EOF
}

install() {
    rm -rf "$venv"
    "${PYTHON:-python3}" -m venv "$venv" || return
    pip install --upgrade pip || return
    pip install "$spec" torchvision || return
    local deps
    mapfile -t deps < <(unpinned_deps)
    ((${#deps[@]})) || { echo "no dependencies read from pyproject.toml" >&2; return 1; }
    echo "dependencies: ${deps[*]}"
    pip install "${deps[@]}" || return
    pip install --no-deps -e "$repo"
}

if [[ ${REUSE:-0} == 1 && -x $py ]]; then
    echo "reusing $venv (nothing installed)" | tee "$logs/install.log"
else
    echo "== installing $spec into $venv (pip cap bypassed: $bypass); log: $logs/install.log"
    install >"$logs/install.log" 2>&1
    status=$?
    if ((status != 0)); then
        tail -n 30 "$logs/install.log"
        echo "installation failed (exit $status); see $logs/install.log" >&2
        exit 1
    fi
fi

{
    "$py" -c "import sys, torch, torchvision, numpy; print('python', sys.version.split()[0]); print('torch', torch.__version__); print('torchvision', torchvision.__version__); print('numpy', numpy.__version__)"
    "$py" -c "import triton; print('triton', triton.__version__)" 2>&1
    "$py" -c "import open_clip; print('open_clip', open_clip.__version__)"
    "$py" -m pip freeze
} >"$logs/versions.txt" 2>&1
head -n 6 "$logs/versions.txt"

: >"$logs/summary.txt"
failed=0
run() { # run NAME COMMAND...: from the repository root, into $logs/NAME.log
    local name=$1 start=$SECONDS
    shift
    echo "== $name: $*"
    "$@" >"$logs/$name.log" 2>&1
    local status=$?
    local last
    last=$(grep -E '(passed|failed|error|no tests ran)' "$logs/$name.log" | tail -n 1)
    printf '%-12s exit %d  %4ds  %s\n' "$name" "$status" $((SECONDS - start)) "$last" | tee -a "$logs/summary.txt"
    ((status == 0)) || failed=1
}
# the package and the shared test modules from this checkout, whatever else is on the path
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
for step in $steps; do
    case $step in
    cpu) run cpu "$py" -m pytest -q --benchmark-disable -p no:cacheprovider ;;
    interp-shim) run interp-shim "$py" -m pytest -q -p no:cacheprovider -m interpreter ;;
    interp-env) run interp-env env TRITON_INTERPRET=1 "$py" -m pytest -q -p no:cacheprovider -m interpreter ;;
    sm90)
        cache=$(mktemp -d)
        run sm90 env TRITON_CACHE_DIR="$cache" "$py" -m pytest -q -p no:cacheprovider tests/kernels -k sm90
        rm -rf "$cache"
        ;;
    *)
        echo "unknown step $step (cpu, interp-shim, interp-env, sm90)" >&2
        exit 2
        ;;
    esac
done
echo "logs: $logs"
exit $failed
