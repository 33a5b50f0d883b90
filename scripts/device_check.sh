#!/usr/bin/env bash
# The GPU checks of issue 5 in one command, for a CUDA machine whose python3 already has
# torch and triton (no internet, no venv: e.g. the lent H200 of this workplace).
#   1. every Triton kernel against the PyTorch reference on CUDA (tests/test_kernels_triton.py
#      runs on CUDA when present; tests/test_kernels.py adds the dispatch and bad-input tests);
#   2. the attention rows of `metaattn-viz bench` at T = 4096 and 16384 in bfloat16: routed
#      Triton against SDPA (flash), FlexAttention, and FlexAttention with the routes' block
#      mask, each with the max abs error against the reference on the last 512 query rows.
# Writes tests.log, bench.json and gpu.txt under $OUT (default ./device-out); record the
# figures in docs/benchmarks.md, "Attention kernels", "GPU", with the date and the device.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check here')" || exit 2

status=0
"$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py tests/test_kernels.py 2>&1 \
  | tee "$OUT/tests.log" || status=1
"$PY" -m metaattn_viz.bench.attention --no-model --seq-lens 4096,16384 --repeats 10 --json \
  > "$OUT/bench.json" 2> "$OUT/bench.err" || status=1
cat "$OUT/bench.json"
tail -5 "$OUT/bench.err"
exit $status
