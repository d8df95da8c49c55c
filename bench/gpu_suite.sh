#!/usr/bin/env bash
# The GPU suite: bench/gpu.py (the engine against diffusers) and bench/job.py (the job against the bare pipeline)
# on one GPU, each part under its own time limit so that a slow compile cannot lose the others; in all at most
# 9 minutes on one H100 or H200 with 16 cores. Results: RESULTS_DIR/{gpu,job}.json, suite.log, summary.md and
# summary.json, and the summary table printed at the end.
#
#   bash bench/gpu_suite.sh RESULTS_DIR              # on the GPU machine, from the repository root
#   bash bench/gpu_suite.sh --dry-run RESULTS_DIR    # all of it on the CPU at tiny sizes (the test suite runs it)
#
# Limits per part in seconds (the part's own budget is 30 s less, so it ends by itself and writes its JSON):
# GPU_SUITE_GPU_S (default 230) and GPU_SUITE_JOB_S (default 260); with `timeout`'s 20 s of grace each, 9 minutes
# at most. --full checkpoints are written once to GPU_SUITE_CHECKPOINTS (default
# ${TMPDIR:-/tmp}/wurstfabrik-bench-full) and reused by later runs, which saves the job part ~20 s.
set -u -o pipefail

dry=0
if [ "${1:-}" = "--dry-run" ]; then
    dry=1
    shift
fi
if [ $# -ne 1 ]; then
    echo "usage: bash bench/gpu_suite.sh [--dry-run] RESULTS_DIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
dir=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
. bench/package_path.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
log="$dir/suite.log"
: >"$log"

if [ "$dry" = 1 ]; then
    gpu_s=${GPU_SUITE_GPU_S:-420}
    job_s=${GPU_SUITE_JOB_S:-600}  # generous: a shared 2-core test machine starts Ray slowly
    gpu_args=(--dry-run --batches 2)
    job_args=(--dry-run)
else
    gpu_s=${GPU_SUITE_GPU_S:-230}
    job_s=${GPU_SUITE_JOB_S:-260}
    gpu_args=(--batches 8,16)
    job_args=(--full --device cuda --prompts 24 --batch 8
              --checkpoint-dir "${GPU_SUITE_CHECKPOINTS:-${TMPDIR:-/tmp}/wurstfabrik-bench-full}")
fi
# The fp8 rows (bench/gpu.py --quantize), where this checkout's bench/gpu.py has them.
if python bench/gpu.py --help 2>/dev/null | grep -q -- --quantize; then
    gpu_args+=(--quantize none,fp8)
fi

# part NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`, its output into the log; its exit status is kept.
statuses=()
part() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*" | tee -a "$log"
    local start=$SECONDS
    timeout -k 20 "$limit" "$@" 2>&1 | tee -a "$log"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$log"
    statuses+=(--part "$name=$status")
}

part gpu "$gpu_s" python -u bench/gpu.py "${gpu_args[@]}" --budget-s "$((gpu_s - 30))" --out "$dir/gpu.json"
part job "$job_s" python -u bench/job.py "${job_args[@]}" --budget-s "$((job_s - 30))" --out "$dir/job.json"
python bench/suite_summary.py "$dir" "${statuses[@]}" 2>&1 | tee -a "$log"
