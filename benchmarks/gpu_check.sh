#!/usr/bin/env bash
# Issue 17's GPU measurements as one call of a lent GPU machine (a session gets 15 minutes of
# device time, 10 a command; the machine's own python3 holds torch and timm, not Hydra):
#   here:   bash benchmarks/gpu_check.sh --prepare   # the wheels its image lacks, into .whl/
#   there:  device run: command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 590
# Sections run in the order issue 17 asks for them, each under its own time limit (540 s in all,
# sized for DeiT-S -> DeiT-Ti at batch 128 on an H100; a section's table prints when it ends),
# and append to $OUT/gpu.md as they finish, so a call cut short still brings back what
# finished; stderr goes to $OUT/gpu.log. Optional argument: the preset (deit_s_ti; tiny tries
# the script on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
# what the machine's image lacks (Hydra; submitit, which engine/runtime.py imports) or may hold in
# another version (timm): pure-Python wheels, built here where one is only a source archive
wheels=(hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 submitit==1.5.4 timm==1.0.31)
if [ "${1:-}" = --prepare ]; then
  exec $py -m pip wheel --no-deps --wheel-dir .whl "${wheels[@]}"
fi
preset=${1:-deit_s_ti}
out=${OUT:-benchmarks/results}/gpu.md log=${OUT:-benchmarks/results}/gpu.log site=/tmp/gpu_check_site
if [ -d .whl ]; then  # beside the image's packages, not into them
  $py -m pip install --quiet --no-index --no-deps --find-links .whl --target $site "${wheels[@]}" >>"$log" 2>&1 \
    || { echo "gpu_check.sh: installing the wheels in .whl/ failed; see $log" >&2; exit 2; }
fi
export PYTHONPATH=$PWD:$site PYTHONUNBUFFERED=1
section() {  # time limit (s), title, script and its arguments
  local limit=$1 title=$2 t0=$SECONDS rc=0; shift 2
  echo "== $title ($(date +%T))" | tee -a "$log"
  { printf '## %s\n\n`python%s`\n\n' "$title" "$(printf ' %q' "$@")"; timeout "$limit" $py "$@" 2>>"$log" || rc=$?
    [ $rc = 0 ] || echo "(stopped after ${limit} s or failed: exit $rc; see gpu.log)"
    printf '\n(%d s)\n\n' $((SECONDS - t0)); } >>"$out"
}
{ echo "# GPU check, $(date '+%F %T'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"; echo
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
  $py -c 'import os, torch, timm; print("torch", torch.__version__, "| timm", timm.__version__, "|", os.cpu_count(), "CPU cores")'
  echo; } >"$out"
section 220 "bf16 and torch.compile, logit KD and SHD ($preset)" benchmarks/speedups.py --preset "$preset" \
  --variants "bf16 + tf32" "bf16 + tf32 + compile" --rounds 1
section 130 "SHD's merges and MiniLMv2 against logit KD, bf16 ($preset)" benchmarks/method_cost.py \
  --preset "$preset" --precision bf16 --rounds 2 --methods logit "shd progressive" "shd mean" minilm
section 100 "one loader worker against timm's stock pipeline" benchmarks/loader_worker.py --rounds 2 \
  --images 800 --arms "timm stock" "ours, uint8" "ours, OpenCV warps"
section 90 "SHD against tokens and heads beyond N = 50" benchmarks/shd_scaling.py --no-full-step --tokens 197 577
echo "done: $out"
