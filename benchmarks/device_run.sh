#!/usr/bin/env bash
# One prepared call on a lent CUDA machine (H100 or H200): the CUDA tests, then the GPU benchmarks of issue 22, each
# stage under its own time limit so that a stage running long leaves the later ones their turn; the default stages
# fit in 8 minutes. Logs and JSON go to $OUT (default ./device-out), named by device; the JSON is written as each
# layer / section finishes, so a cut-short stage keeps what it measured. Run from the repository root:
#
#     LTHFAST_GIT_COMMIT=$(git rev-parse HEAD) bash benchmarks/device_run.sh
#
# Stages (STAGES, comma-separated, in this order; limits in seconds can be overridden, e.g. LIMIT_tests=200):
#   tests      gpu-marked tests and, beside them, the layer tests on CUDA, both with LTHFAST_AUTOTUNE=0 (one config:
#              correctness; the benchmark stages tune)
#   profile    gpu_profile.py --profile: the HBM and L2 bandwidth line, raw kernels vs cuBLAS/cuDNN, host syncs
#   linear     bench_masked_linear.py --sections targets: Linear 4096x4096, 8192 tokens, bf16, training step, at 0%,
#              32 / 64 / 128 blocks x 90 / 98% and unstructured 90%, against dense and mask-multiply
#              -> masked_linear-<gpu>.json
#   graphs     the same with every step captured as a CUDA graph (no host time) -> masked_linear-graphs-<gpu>.json
#   conv       ResNet-18 layer3 (256 -> 256, 14x14, batch 128) in 64-channel blocks at 90 / 98% -> masked_conv-<gpu>.json
#   imp        a short `lthfast imp` on CUDA (MNIST-1D MLP, 2 levels of 100 iterations), graphed steps, then the same
#              with --no-cuda-graph -> $OUT/runs
#   predict    benchmarks/predict_gpu.py: the model's predictions, to read beside the measured rows
#   crossover  (not default) bench_masked_linear.py --sections crossover --mode train --cuda-graph: the "auto"
#              crossover for graphed steps (predicted by predict_gpu.py) -> masked_linear-crossover-<gpu>.json
#   host       (not default) host_overhead.py: the tuner's and the op layers' host time per call on this CPU
set -u
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
STAGES=${STAGES:-tests,profile,linear,graphs,conv,imp,predict}
PY=${PY:-python3}
LOG=$OUT/device.log
GPU=$($PY -c "import torch; n = torch.cuda.get_device_name(); print(next((g for g in ('h100', 'h200', 'a100', 'l4') if g in n.lower()), 'gpu'))")

say() { echo "$*" | tee -a "$LOG"; }

run_stage() {  # run_stage NAME DEFAULT_LIMIT COMMAND...: run COMMAND when NAME is in $STAGES, under its limit
  local name=$1 limit=$2 start rc var
  shift 2
  case ",$STAGES," in *",$name,"*) ;; *) return 0 ;; esac
  var=LIMIT_$name
  limit=${!var:-$limit}
  say "== $name: limit ${limit}s, start $(date +%T)"
  start=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  say "== $name: rc $rc after $((SECONDS - start))s"
}

tests() {
  local common=(-q -p no:cacheprovider -o addopts= -rfE --timeout=120)
  LTHFAST_AUTOTUNE=0 $PY -m pytest "${common[@]}" -n 6 -m gpu tests >"$OUT/tests-gpu.log" 2>&1 &
  local gpu=$!
  LTHFAST_AUTOTUNE=0 $PY -m pytest "${common[@]}" -n 8 -m "not gpu and not slow" tests/test_masked_linear.py \
    tests/test_masked_conv.py tests/test_persistent_kernels.py tests/test_persistent_conv.py tests/test_dw_fixup.py \
    tests/test_amp.py tests/test_compile.py >"$OUT/tests-cuda.log" 2>&1
  wait $gpu
  tail -n 25 "$OUT/tests-gpu.log" "$OUT/tests-cuda.log"
}

if [ "${1:-}" = "--tests" ]; then  # the tests stage, run as its own process so that `timeout` can run it
  tests
  exit
fi

say "# $(nvidia-smi -L 2>&1 | head -1); $($PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"
# The C++ extension serves the CPU paths only; build it in the background, as the project installs.
($PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; echo "install rc $?" >>"$OUT/install.log") &

run_stage tests 130 bash "$0" --tests
run_stage profile 45 $PY benchmarks/gpu_profile.py --profile
run_stage linear 85 $PY benchmarks/bench_masked_linear.py --sections targets --rep-ms 50 \
  --out "$OUT/masked_linear-$GPU.json"
run_stage graphs 85 $PY benchmarks/bench_masked_linear.py --sections targets --rep-ms 50 --cuda-graph \
  --out "$OUT/masked_linear-graphs-$GPU.json"
run_stage conv 55 $PY benchmarks/bench_masked_conv.py --nets resnet18-imagenet --layers layer3 --batch 128 \
  --sparsity 0.9 0.98 --layouts channel-block-64 --out "$OUT/masked_conv-$GPU.json"
run_stage imp 35 $PY -m lthfast imp --device cuda --model mlp --dataset mnist1d --levels 2 --train-steps 100it \
  --replicates 1 --out-dir "$OUT/runs" --name imp-cuda --quiet
run_stage imp 25 $PY -m lthfast imp --device cuda --model mlp --dataset mnist1d --levels 2 --train-steps 100it \
  --replicates 1 --out-dir "$OUT/runs" --name imp-cuda-eager --quiet --no-cuda-graph
run_stage predict 15 $PY benchmarks/predict_gpu.py
run_stage crossover 70 $PY benchmarks/bench_masked_linear.py --sections crossover --mode train --rep-ms 50 \
  --cuda-graph --out "$OUT/masked_linear-crossover-$GPU.json"
run_stage host 40 $PY benchmarks/host_overhead.py --repeat 3 --calls 1000
wait
tail -n 2 "$OUT/install.log" | tee -a "$LOG"
