#!/usr/bin/env bash
# One device call for the GPU benchmark (bench/gpu.py): install the carried wheels, run the sections, leave
# one JSON per section and the log under $OUT. Prepared on the development machine (BENCHMARKS.md):
#   make gpu-carry        # .whl/ (transformers as locked, pydantic, bitsandbytes) and .bench-pages/ (PNGs)
# then, through the device tool: carry [".whl", ".bench-pages"], command "bash bench/gpu_session.sh".
# SECTIONS picks the sections of the bf16 run; quantization runs after it, in its own process, when
# bitsandbytes is among the wheels (it saves the model and reloads it in 4 bits).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  python3 -m bench.gpu run --pages-dir .bench-pages --out "$OUT" \
    --sections "${SECTIONS:-short,transcription,engines,sweep,encoder,prefix}" "$@"
  if ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
    python3 -m bench.gpu run --pages-dir .bench-pages --out "$OUT" --sections quantization "$@"
  fi
} 2>&1 | tee "$OUT/log.txt"
