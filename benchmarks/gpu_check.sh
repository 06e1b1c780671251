#!/usr/bin/env bash
# One prepared check for an NVIDIA machine (sized to finish in under 8 minutes):
#   1. the Triton kernel tests natively (compiled kernels on CUDA tensors, no interpreter);
#   2. `gradsafe bench --sweep`: the table of issue 3 (naive loop, torch backend, Triton backend,
#      AdamW default / fused, bytes floor; k = 1, 4, 16, 64; fp32 / bf16 basis; global / tensor
#      scope; 1, 200, 500 tensors) with the targets checked;
#   3. `gradsafe bench` on one configuration (200 tensors, k = 16);
#   4. `gradsafe bench --scope factored` (16 matrices of 4096 x 4096, rank 64: matmuls).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (default: $OUT if set, else benchmarks/gpu_out)
# First installs this checkout in editable mode (pip, no dependencies, no network): the kernels
# are the top-level kernels/ folder, importable as gradsafe.kernels only through an install.
# Writes OUT_DIR/{install.txt,env.txt,tests.txt,sweep.txt,sweep.log,single.txt,factored.txt,summary.txt}. Each stage has
# its own time limit; the sweep prints its rows as it goes (sweep.log), so a stage cut short
# still leaves its measured rows.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-${OUT:-$ROOT/benchmarks/gpu_out}}"
mkdir -p "$DEST"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET GRADSAFE_BACKEND
export GRADSAFE_TRITON_NATIVE=1
export TRITON_DEFAULT_FP_FUSION=1
T0=$(date +%s)

python -m pip install --no-deps --no-build-isolation --no-index -e "$ROOT" > "$DEST/install.txt" 2>&1 \
  || echo "editable install failed: see $DEST/install.txt"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv 2>&1 || echo "nvidia-smi failed"
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))"
  python -c "import gradsafe.kernels; print('gradsafe.kernels from', gradsafe.kernels.__file__)"
} > "$DEST/env.txt" 2>&1
cat "$DEST/env.txt"

echo "== 1. kernel tests, native" | tee "$DEST/summary.txt"
timeout 150 python -m pytest tests/kernels tests/backends/test_triton_backend.py -q -p no:cacheprovider -x 2>&1 | tee "$DEST/tests.txt" | tail -25
RC_TESTS=${PIPESTATUS[0]}
echo "tests exit $RC_TESTS ($(( $(date +%s) - T0 )) s)" | tee -a "$DEST/summary.txt"

echo "== 2. sweep" | tee -a "$DEST/summary.txt"
timeout 260 python -m gradsafe.cli bench --sweep --rounds 7 --out "$DEST/sweep.txt" 2>&1 | tee "$DEST/sweep.log"
RC_SWEEP=${PIPESTATUS[0]}
echo "sweep exit $RC_SWEEP ($(( $(date +%s) - T0 )) s)" | tee -a "$DEST/summary.txt"

echo "== 3. one configuration" | tee -a "$DEST/summary.txt"
timeout 50 python -m gradsafe.cli bench --tensors 200 --rank 16 --rounds 10 --out "$DEST/single.txt" 2>&1 | tail -15
RC_SINGLE=${PIPESTATUS[0]}
echo "single exit $RC_SINGLE ($(( $(date +%s) - T0 )) s)" | tee -a "$DEST/summary.txt"

echo "== 4. factored scope" | tee -a "$DEST/summary.txt"
timeout 60 python -m gradsafe.cli bench --scope factored --rounds 10 --out "$DEST/factored.txt" 2>&1 | tail -12
RC_FACTORED=${PIPESTATUS[0]}
echo "factored exit $RC_FACTORED ($(( $(date +%s) - T0 )) s)" | tee -a "$DEST/summary.txt"

[ -f "$DEST/sweep.txt" ] && grep -A10 "^targets:" "$DEST/sweep.txt" | tee -a "$DEST/summary.txt"
exit $(( RC_TESTS != 0 || RC_SWEEP != 0 || RC_SINGLE != 0 || RC_FACTORED != 0 ))
