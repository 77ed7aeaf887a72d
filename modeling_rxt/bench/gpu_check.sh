#!/usr/bin/env bash
# The project's GPU checks in one call, for a machine with an NVIDIA GPU (CI has none; README, Benchmarks): the CUDA
# tests, then the benchmarks of `make bench` on the GPU, sdpa in float32 and in bfloat16, and flash-attention where
# the flash-attn package is installed. Every figure lands in $OUT (default runs/gpu): the log and a tarball of the
# benchmark folders. Wheels in the folder given as $1 (default .whl) are installed first into /tmp/site, for a
# machine whose image lacks a package or has another version of it.
# Local dry run of the pipeline, no GPU: DEVICE=cpu EXTRA=--quick PYTHON=.venv/bin/python bash modeling_rxt/bench/gpu_check.sh
# COMPILE=1 adds bfloat16 decoding with a static cache and the decoding step compiled (inductor; up to 100 s more).
set -u
OUT=${OUT:-runs/gpu}
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}
PY=${PYTHON:-python3}
WHEELS=${1:-.whl}
BENCH_DIR=$(mktemp -d)/bench
mkdir -p "$OUT" "$BENCH_DIR"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
# Fewer sampled turns and repeats than `make bench`: the GPU lease is short (turn 1..128 still all run for RxT).
BENCH="$PY -m modeling_rxt.bench --device $DEVICE --threads 4 --turns 1,16,64,128 --repeats 3 $EXTRA"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  "$PY" -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
  FLASH=$("$PY" -c "import importlib.util; print(int(importlib.util.find_spec('flash_attn') is not None))")
  echo "flash_attn installed: $FLASH"
  timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    "tests/test_external_memory.py::test_memory_on_cpu_model_on_cuda"
  timeout 260 $BENCH --only turn_latency,decode,write,training --out "$BENCH_DIR/sdpa-float32"
  timeout 70 $BENCH --dtype bfloat16 --only decode,write,training --out "$BENCH_DIR/sdpa-bfloat16"
  if [ "$FLASH" = 1 ]; then
    timeout 90 $BENCH --dtype bfloat16 --attn flash_attention_2 --only decode,write,training \
      --out "$BENCH_DIR/flash_attention_2-bfloat16"
  fi
  if [ "${COMPILE:-0}" = 1 ]; then
    timeout 100 $BENCH --dtype bfloat16 --only decode --compile inductor --out "$BENCH_DIR/sdpa-bfloat16-compiled"
  fi
  timeout 60 $BENCH --only training_memory --out "$BENCH_DIR/sdpa-float32-memory"
  date -u
} 2>&1 | tee "$OUT/gpu_check.log"
tar czf "$OUT/gpu_bench.tar.gz" -C "$(dirname "$BENCH_DIR")" bench
