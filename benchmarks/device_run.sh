#!/usr/bin/env bash
# One prepared call on a lent CUDA machine: the CUDA tests, then the GPU benchmarks, each stage under its own
# time limit so that a stage running long leaves the later ones their turn. Logs and JSON go to $OUT
# (default ./device-out); the JSON is written as each layer / section finishes, so a cut-short stage keeps
# what it measured. Run from the repository root:
#
#     LTHFAST_GIT_COMMIT=$(git rev-parse HEAD) STAGES=tests,profile,linear bash benchmarks/device_run.sh
#
# The next call after the H200 session (2026-11-30) should answer, within one 10-minute call: do the layer tests
# pass on CUDA now, how much of a step is host time (gpu_profile's graphed columns), and what the targets give with
# the host out:   STAGES=tests,profile,graphs,host LIMIT_tests=240 bash benchmarks/device_run.sh
#
# Stages (STAGES, comma-separated, in this order; limits in seconds can be overridden, e.g. LIMIT_tests=200):
#   tests      gpu-marked tests and, beside them, the layer tests on CUDA, both with LTHFAST_AUTOTUNE=0 (one config:
#              correctness; the profile and benchmark stages tune, now up to 11 configs per dW key, each compiled)
#   profile    gpu_profile.py --profile: raw kernels vs cuBLAS/cuDNN, the step's host syncs, a profiler table
#   linear     bench_masked_linear.py --sections targets          -> masked_linear-<gpu>.json
#   conv       bench_masked_conv.py on ResNet-18 (ImageNet) 3x3 layers with >= 128 channels -> masked_conv-<gpu>.json
#   crossover  bench_masked_linear.py --sections crossover --mode train -> masked_linear-crossover-<gpu>.json
#   graphs     the linear targets and the conv layer3 rows with every step captured as CUDA graphs (no host time)
#              -> masked_linear-graphs-<gpu>.json, masked_conv-graphs-<gpu>.json
#   host       host_overhead.py: the tuner's and the op layers' host time per call on this machine's CPU
set -u
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
STAGES=${STAGES:-tests,profile,linear,conv,crossover,graphs,host}
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
    tests/test_masked_conv.py tests/test_amp.py tests/test_compile.py >"$OUT/tests-cuda.log" 2>&1
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

run_stage tests 170 bash "$0" --tests
run_stage profile 90 $PY benchmarks/gpu_profile.py --profile
run_stage linear 110 $PY benchmarks/bench_masked_linear.py --sections targets --rep-ms 50 \
  --out "$OUT/masked_linear-$GPU.json"
run_stage conv 110 $PY benchmarks/bench_masked_conv.py --nets resnet18-imagenet --layers layer2 layer3 layer4 \
  --batch 128 --sparsity 0.5 0.8 0.9 0.98 --layouts tile-block channel-block-32 --out "$OUT/masked_conv-$GPU.json"
run_stage crossover 70 $PY benchmarks/bench_masked_linear.py --sections crossover --mode train --rep-ms 50 \
  --out "$OUT/masked_linear-crossover-$GPU.json"
run_stage graphs 120 bash -c "$PY benchmarks/bench_masked_linear.py --sections targets --rep-ms 50 --cuda-graph \
  --out $OUT/masked_linear-graphs-$GPU.json; $PY benchmarks/bench_masked_conv.py --nets resnet18-imagenet \
  --layers layer3 --batch 128 --sparsity 0.9 0.98 --layouts tile-block --cuda-graph \
  --out $OUT/masked_conv-graphs-$GPU.json"
run_stage host 40 $PY benchmarks/host_overhead.py --repeat 3 --calls 1000
wait
tail -n 2 "$OUT/install.log" | tee -a "$LOG"
