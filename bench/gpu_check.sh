#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on a lent H100/H200, in < 9 minutes wall, model build included.
#
#   bench/gpu_check.sh                 # on the GPU machine; writes $OUT/gpu-check.json (+ .log), else bench/results/
#   bench/gpu_check.sh --cpu-smoke     # here: the same code with tiny sizes on the CPU
#
# The GPU image has torch, accelerate, peft, transformers, but not diffusers or torch-fidelity: carry
# them as wheels in .whl/ (git-ignored), made here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d .whl diffusers==0.42.1 torch-fidelity==0.4.0   # (importlib_metadata: only Python < 3.8)
# and name .whl in the device call's carry. They go to a private --target folder, never into the image.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$ROOT/bench/results}
mkdir -p "$OUTDIR"
PKGS=$(mktemp -d /tmp/fd-pkgs.XXXXXX)
ln -s "$ROOT" "$PKGS/facediffuser"          # the repository root is the package (pyproject: package-dir)
SITE=""
if ! "$PY" -c "import diffusers, torch_fidelity" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        SITE=$(mktemp -d /tmp/fd-site.XXXXXX)
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || echo "!!! wheel install failed" >&2
    else
        echo "!!! diffusers/torch-fidelity missing and no .whl/ folder: the sub-benchmarks that need them will fail" >&2
    fi
fi
export PYTHONPATH="$PKGS${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
# 530 s: the script budgets itself to 480 s; the rest is interpreter start and the JSON
timeout -k 10 530 "$PY" bench/gpu_check.py --json "$OUTDIR/gpu-check.json" "$@" 2>&1 | tee "$OUTDIR/gpu-check.log"
rc=${PIPESTATUS[0]}
rm -rf "$PKGS" ${SITE:+"$SITE"}
echo "gpu_check exit code $rc"
exit "$rc"
