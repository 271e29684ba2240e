#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR: the GPU check of qrkd, for a machine with a CUDA GPU and no network (DESIGN.md section 5:
# Python 3.12, torch 2.11, triton 3.6, nvcc and ninja, no merlinquantum). Run from anywhere; it works in the checkout
# that holds it. Each stage runs under its own time cap and writes its log into OUTDIR as soon as it ends:
#   env      versions, nvidia-smi, nvcc                                   ->  env.log              (cap  10 s)
#   install  pip install --no-deps --no-build-isolation -e . with the      ->  install.log          (cap 130 s)
#            CUDA kernels (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0: sm_90 only)
#   info     python -m qrkd info                                          ->  info.log             (cap  10 s)
#   tests    pytest -m gpu tests (QRKD_REQUIRE_EXT=1: no silent fallback)  ->  tests.log, tests.xml (cap  55 s)
#   bench    python -m qrkd bench --device cuda --quick: the seed's shapes ->  bench.log + the sweep's JSON, markdown
#            and the issues' GPU targets (angle N=1024 and 8192 at D=512      and PNGs in OUTDIR    (cap  80 s)
#            with torch.compile(reference) at 1024, distance/fidelity and
#            photonic at N=8192), each measurement in its own process
#            with a 10 s budget (+40 s to compile)
#   report   rewrites the markdown/PNGs from the JSON (it is written after every case, so a bench stage cut by its
#            cap still leaves a usable, partial JSON)                     ->  report.log           (cap  10 s)
# The caps add up to 295 s: the whole stays under 5 minutes. OUTDIR/summary.txt has one line per stage (exit status,
# seconds). The script's own exit status is 0 when every stage passed, else 1.
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export FORCE_CUDA=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PY OUT
: > "$OUT/summary.txt"
status=0
t_all=$(date +%s)

stage() {  # stage NAME CAP_SECONDS COMMAND...
  local name=$1 cap=$2 rc t0 note=""
  shift 2
  t0=$(date +%s)
  timeout -k 3 "$cap" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then note=" (cut at the ${cap} s cap)"; fi
  echo "$name: exit $rc$note after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
  if [ $rc -ne 0 ]; then status=1; fi
  return 0
}

env_report() {
  date -u
  nvidia-smi || true
  "$PY" -c 'import platform, torch; print("python", platform.python_version(), "torch", torch.__version__, "cuda",
torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
  "$PY" -c 'import triton; print("triton", triton.__version__)' || true
  "$CUDA_HOME/bin/nvcc" --version || nvcc --version || true
  echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
}

export -f env_report

bench_report() {
  local found=0 f
  for f in "$OUT"/*.json; do
    [ -e "$f" ] || continue
    found=1
    "$PY" -m qrkd bench --report "$f" || return 1
  done
  [ $found -eq 1 ] || { echo "no benchmark JSON in $OUT"; return 1; }
}

export -f bench_report

stage env 10 bash -c env_report
stage install 130 "$PY" -m pip install --no-deps --no-build-isolation -e .
stage info 10 "$PY" -m qrkd info
stage tests 55 env QRKD_REQUIRE_EXT=1 "$PY" -m pytest -m gpu tests -q -rA -p no:cacheprovider \
  --junitxml="$OUT/tests.xml"
stage bench 80 "$PY" -m qrkd bench --device cuda --quick --case-timeout 10 --max-minutes 0 --out "$OUT"
stage report 10 bash -c bench_report
echo "gpu_check: done in $(( $(date +%s) - t_all )) s, status $status; results in $OUT" | tee -a "$OUT/summary.txt"
exit $status
