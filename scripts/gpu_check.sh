#!/usr/bin/env bash
# One call on a GPU machine: the GPU tests, the kernel benchmark (bf16; bf16 activations with
# fp32 weights; fp32), the launch-parameter sweep and the training-step benchmark; tables
# printed last, full JSON/markdown in $OUT. Each step has its own time limit (715 s for the
# default steps: more than one 600 s device call, so a call names a subset), so a hung step
# cannot hold the machine; on an H200 (runs 7-15): tests 51-85 s warm, 120-128 on a fresh
# machine, where every kernel compiles cold (160 since run 15: more tests, and the C++ launch
# operator built); bench 77-88, training 37-48 with 10 steps a row and 61-76 with 20,
# mixed 30-33 (40 cold), fp32 40-45, tune 94-131, profile 14-20; trainprof 58, direct 59;
# hostprobe 30, cpp 39, cppkernels 32.
#
#   bash scripts/gpu_check.sh            # on the GPU machine ($OUT defaults to benchmarks/results/gpu)
#   bash scripts/gpu_check.sh --quick    # dry run of the same steps on a CPU (tiny shapes)
#   STEPS=bench,tune bash scripts/gpu_check.sh   # a subset of: tests,bench,tune,training,mixed,fp32,profile
#                                                  # (profile: host vs kernel time per call, our host time
#                                                  # split into our Python and Triton's launcher, and with
#                                                  # the direct launch)
#   STEPS=trainprof bash scripts/gpu_check.sh     # not in the default set: the training benchmark with every
#                                                  # row profiled (kernel time by kind, the kernels that differ
#                                                  # most from the Identity row), in $OUT/trainprof/
#   STEPS=direct bash scripts/gpu_check.sh        # not in the default set: the training table with its patched
#                                                  # rows launched directly from Python and through Triton, in $OUT/direct/
#   STEPS=tunegpt2 bash scripts/gpu_check.sh      # not in the default set: the sweep at GPT-2-medium's norm shape
#                                                  # (8192x1024), in $OUT/tune_gpt2/
#   STEPS=hostprobe bash scripts/gpu_check.sh     # not in the default set: the host time of a norm's training forward,
#                                                  # piece by piece, and of GPT-2-medium's forward (host_probe.py)
#   STEPS=cpp,cppkernels bash scripts/gpu_check.sh  # not in the default set: GPT-2-medium's training table with the
#                                                  # patched rows' kernels launched from Python and through the C++
#                                                  # launch operator (the default), in turn, and the kernel
#                                                  # table's rows of ours both ways, in $OUT/cpp/
#   STEPS=generate bash scripts/gpu_check.sh      # not in the default set: token-by-token generation (greedy, KV
#                                                  # cache) as shipped and patched, in $OUT/generate/
#   STEPS=gated bash scripts/gpu_check.sh         # not in the default set: the gated norms' kernel table (ours,
#                                                  # the HF classes eager and compiled), in $OUT/kernels_gated.md
#   STEPS=gatedprof bash scripts/gpu_check.sh     # not in the default set: our gated calls kernel by kernel and
#                                                  # their host time (profile_norms.py), in $OUT/gated_profile/
#   STEPS=gemmprobe bash scripts/gpu_check.sh     # not in the default set: Llama-1B's GEMMs timed alone on what each
#                                                  # variant's linears multiplied (probe_gemm_data.py), in $OUT/gemm_probe/
set -uo pipefail
cd "$(dirname "$0")/.."
quick=""
[ "${1:-}" = "--quick" ] && quick="--quick"
OUT="${OUT:-benchmarks/results/gpu}"
STEPS=",${STEPS:-tests,bench,tune,training,mixed,fp32,profile},"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# the dry run on a machine without a GPU: the sweep runs its kernels in Triton's interpreter
if [ -n "$quick" ] && ! nvidia-smi >/dev/null 2>&1; then export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"; fi
PY="${PYTHON:-python3}"
status=0

# Extra wheels (e.g. liger-kernel for the peer column) travel in .whl/, see the device notes.
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>/dev/null || echo "no GPU"; \
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; \
  echo "C++ compiler (the C++ launch operator's build): $(command -v "${CXX:-c++}" || command -v g++ || command -v clang++ || echo none)"; } \
  | tee "$OUT/device.txt"

# step NAME SECONDS COMMAND...: run COMMAND when NAME is in $STEPS, log in $OUT/NAME.log
step() {
  local name=$1 limit=$2; shift 2
  case "$STEPS" in *",$name,"*) ;; *) return 0 ;; esac
  # the limits fit the device's eight minutes; the CPU dry run's interpreted kernels run at the
  # speed of whatever machine CI gets (tune: under 150 s before, 245 s on a slower 2-core one)
  [ -n "$quick" ] && limit=$((limit * 4))
  local start=$SECONDS rc=0
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  echo "== $name: exit $rc in $((SECONDS - start)) s$([ "$rc" -eq 124 ] && echo " (time limit ${limit} s)")" | tee -a "$OUT/steps.txt"
  [ "$rc" -eq 0 ] || status=1
  # the device call returns at most 8 files: everything also travels as one archive, renewed
  # after each step so that a call cut short still brings back what finished
  # (written beside $OUT first: tar fails when the folder it reads changes under it)
  tar -czf "${TMPDIR:-/tmp}/gpu_check_all.tgz" -C "$OUT" --exclude all.tgz . 2>/dev/null \
    && mv "${TMPDIR:-/tmp}/gpu_check_all.tgz" "$OUT/all.tgz"
}

PEERS="torch F.layer_norm,torch F.rms_norm,HF eager RMSNorm"
OURS="hf_rmsnorm RMSNorm,hf_rmsnorm RMSNorm+bias,hf_rmsnorm LayerNorm"
step tests 240 "$PY" -m pytest tests/test_gpu.py tests/test_gpu_gated.py -q -rfEs --durations=15 -p no:cacheprovider
step bench 95 "$PY" scripts/benchmark_kernels.py $quick --out "$OUT" --name kernels_bf16 ${BENCH_PROVIDERS:+--providers "$BENCH_PROVIDERS"}
# 20 steps a row: with 10, one GPT-2-medium bf16 row's median moved by up to 0.13x between
# repeats on one machine (run 12); with 20 the step took 61 s after the GPU tests and ran past
# 75 s on a fresh machine compiling cold (run 14b)
train_steps=20
[ -n "$quick" ] && train_steps=2
step training 90 "$PY" scripts/benchmark_training.py $quick --steps "$train_steps" --out "$OUT"
step mixed 50 "$PY" scripts/benchmark_kernels.py $quick --out "$OUT" --name kernels_bf16_fp32w --w-dtype fp32 --providers "$OURS,$PEERS"
step fp32 60 "$PY" scripts/benchmark_kernels.py $quick --out "$OUT" --name kernels_fp32 --x-dtype fp32 --providers "$OURS,$PEERS"
step tune 150 "$PY" scripts/tune_kernels.py $quick --out "$OUT"
# GPT-2-medium's norm shape (batch 8 x 1024) first: its training step is host-bound
[ -z "$quick" ] && step profile 60 "$PY" scripts/profile_norms.py --shapes 8192x1024,65536x768 --out "$OUT"
# the sweep at GPT-2-medium's own norm shape (batch 8 x 1024 tokens, 1024 columns), which the
# benchmark shapes do not include
gpt2_shape=8192x1024
[ -n "$quick" ] && gpt2_shape=16x96  # the interpreter: as small as the quick sweep's own shape
step tunegpt2 75 "$PY" scripts/tune_kernels.py $quick --shapes "$gpt2_shape" --out "$OUT/tune_gpt2"
# the host time of a norm's forward with autograd recording, piece by piece (the GPT-2-medium
# step's forward is paced by the host: run 14b)
[ -z "$quick" ] && step hostprobe 90 "$PY" scripts/host_probe.py --out "$OUT"
step trainprof 90 "$PY" scripts/benchmark_training.py $quick --profile --out "$OUT/trainprof"
# the training table with the patched rows twice, the kernels launched through Triton and
# directly, in turn (GPT-2-medium's bf16 step is host-bound)
step direct 90 "$PY" scripts/benchmark_training.py $quick \
  --variants "as shipped,layernorm+python,layernorm+triton,rmsnorm+python,rmsnorm+triton,norms -> Identity" --out "$OUT/direct"

# the C++ launch operator (the default on CUDA since run 15) against the launch from Python:
# GPT-2-medium's training table (its forward is host-paced), then the kernel table's rows of
# both ways (do_bench includes the host)
step cpp 90 "$PY" scripts/benchmark_training.py $quick --models gpt2-medium \
  --variants "as shipped,layernorm+python,layernorm,rmsnorm+python,rmsnorm,norms -> Identity" --out "$OUT/cpp"
step cppkernels 60 "$PY" scripts/benchmark_kernels.py $quick --out "$OUT/cpp" --name kernels_cpp --providers \
  "hf_rmsnorm RMSNorm (Python launch),hf_rmsnorm RMSNorm,hf_rmsnorm LayerNorm (Python launch),hf_rmsnorm LayerNorm,torch F.layer_norm"
# the gated norms (Qwen3-Next's gate after the norm, Mamba2's before it in groups) on their shapes
step gated 90 "$PY" scripts/benchmark_kernels.py $quick --gated --out "$OUT" --name kernels_gated
# their calls kernel by kernel (the weight gradient's fold by torch: a sum and a cast after the
# backward kernel) and host time, at Qwen3.5's heads and Mamba2's 8 groups
[ -z "$quick" ] && step gatedprof 60 "$PY" scripts/profile_norms.py --shapes 262144x128,16384x8192 --iters 20 \
  --providers "hf_rmsnorm gated: gate after,hf_rmsnorm gated: gate before in 8 groups" --out "$OUT/gated_profile"
# the Llama rows' matmul gap (run 17): the same GEMMs on each variant's own tensors, timed alone
# (three 1B models built and warmed up in turn, then 3 rounds of 126 do_bench calls: ≈ 60 s)
step gemmprobe 120 "$PY" scripts/probe_gemm_data.py $quick --out "$OUT/gemm_probe"
# token-by-token generation: a few rows a norm call, so the norms' host time decides
step generate 150 "$PY" scripts/benchmark_generation.py $quick --out "$OUT/generate"

echo
grep -E "^(FAILED|ERROR)|passed|failed|skipped" "$OUT/tests.log" 2>/dev/null | cut -c1-400
for f in gemm_probe/gemm_probe gated_profile/profile kernels_gated generate/generation cpp/kernels_cpp cpp/training direct/training trainprof/training tune_gpt2/tuning tuning host_probe profile kernels_fp32 kernels_bf16_fp32w kernels_bf16 training; do
  [ -f "$OUT/$f.md" ] && sed -n '/^# /p;/^copy/p;/^torch/p;/^|/p;/^- /p;/^`do_bench`/p;/^CUDA-graph/p;/against the Identity row/p;/^× /p' "$OUT/$f.md"
done
cat "$OUT/steps.txt" 2>/dev/null
exit $status
