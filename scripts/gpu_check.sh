#!/usr/bin/env bash
# One call on a GPU machine: the GPU tests, the kernel benchmark (bf16, and bf16 activations
# with fp32 weights) and the training-step benchmark; tables printed last, full JSON/markdown
# in $OUT. Made to finish inside eight minutes on one H100/H200.
#
#   bash scripts/gpu_check.sh            # on the GPU machine ($OUT defaults to benchmarks/results/gpu)
#   bash scripts/gpu_check.sh --quick    # dry run of the same steps on a CPU (tiny shapes)
set -uo pipefail
cd "$(dirname "$0")/.."
quick=""
[ "${1:-}" = "--quick" ] && quick="--quick"
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

# Extra wheels (e.g. liger-kernel for the peer column) travel in .whl/, see the device notes.
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"; \
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } | tee "$OUT/device.txt"

"$PY" -m pytest tests/test_gpu.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

bench_rc=0
"$PY" scripts/benchmark_kernels.py $quick --out "$OUT" --name kernels_bf16 > "$OUT/bench_bf16.log" 2>&1 || bench_rc=$?
"$PY" scripts/benchmark_kernels.py $quick --out "$OUT" --name kernels_bf16_fp32w --w-dtype fp32 \
  --providers "hf_rmsnorm RMSNorm,hf_rmsnorm LayerNorm,torch F.layer_norm,torch F.rms_norm,HF eager RMSNorm" \
  > "$OUT/bench_bf16_fp32w.log" 2>&1 || bench_rc=$?

"$PY" scripts/benchmark_training.py $quick --out "$OUT" > "$OUT/bench_training.log" 2>&1 || bench_rc=$?

echo
echo "== gpu tests: $(tail -n 1 "$OUT/gpu_tests.log")"
echo "== benchmark exit codes: $bench_rc (logs in $OUT)"
cat "$OUT/kernels_bf16_fp32w.md" 2>/dev/null
cat "$OUT/kernels_bf16.md" 2>/dev/null
cat "$OUT/training.md" 2>/dev/null
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
