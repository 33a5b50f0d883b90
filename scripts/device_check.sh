#!/usr/bin/env bash
# The GPU acceptance of issue 12 in one command (< 8 minutes), for a bare CUDA machine whose
# python3 has torch (>= 2.11), triton, transformers, numpy, scipy, pandas, pyarrow and
# safetensors: no gradio, duckdb or plotly, no network, no model file, no venv.
#   1. the Triton kernels against the PyTorch reference on CUDA (tests/test_kernels_triton.py,
#      tests/test_kernels.py);
#   2. python -m metaattn_viz.bench.gpu_check: the routed model on CUDA against the CPU
#      (prefill + 8 decode steps, hedged and not, budget 1.0 equal to dense, decode decisions
#      without host synchronisation, bfloat16 streaming), the bench rows (attention at
#      T = 16384 in bfloat16; SmolLM2-135M's architecture from assets/models/smollm2-135m/
#      config.json with random weights: routing overhead, a 16384-token prefill, decoding
#      after 256 and 32768 tokens), and one generation through the app's engine.
# Writes gpu.txt, tests.log, gpu_check.json and gpu_check.log under $OUT (default
# ./device-out); record the figures in docs/benchmarks.md, "GPU", with the date and device.
# Without a GPU, `python -m metaattn_viz.bench.gpu_check --rehearse` runs step 2 on the CPU
# (Triton interpreter, a tiny model, small sizes): a check of the code, not of the speed.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
PY="${PYTHON:-python3}"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
  # Triton builds its launcher with a C compiler and Python's headers at the first launch:
  # without them every Triton launch fails, and this line says why
  "$PY" -c "import os, shutil, sysconfig; cc = os.environ.get('CC') or next(filter(None, map(shutil.which, ('cc', 'gcc', 'clang'))), None); print('C compiler', cc or 'none', '| Python.h', os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))"
} 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check here')" || exit 2

status=0
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py tests/test_kernels.py 2>&1 \
    | tail -40 | tee "$OUT/tests.log" || status=1
else
  echo "pytest is not installed: kernel tests skipped (gpu_check still compares the model)" | tee "$OUT/tests.log"
fi
timeout 300 "$PY" -m metaattn_viz.bench.gpu_check --out "$OUT" ${GPU_CHECK_ARGS:-} 2>&1 \
  | tee "$OUT/gpu_check.log" || status=1
exit $status
