#!/usr/bin/env bash
# igpt's CUDA path end to end, in one go, on a lent GPU (figures, not a test): the CUDA-marked tests, the
# training/sampling benchmark against Hugging Face, then `igpt pretrain --device cuda --precision bf16
# --compile` with the igpt-s shape on a synthetic 32x32, K=512 set for 2 minutes, a 1-minute resume, a probe
# on the GPU and a sample. Each stage has its own time limit and a failing stage does not stop the next, so
# one call shows every failure. Results land in $OUT (default runs/gpu_check).
#
# Run:  bash benchmarks/gpu_check.sh                  # on the GPU machine, from the repository root
#       CPU_DRY_RUN=1 bash benchmarks/gpu_check.sh    # the same stages on CPU with tiny shapes (seconds)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d)
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
stage() { echo; echo "=== $(date +%T) $*"; }
run() {  # run LIMIT_SECONDS CMD...: the command under a time limit, its exit status reported
  local limit=$1
  shift
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "--- exit $rc after $((SECONDS - t0)) s: $*"
}

if [ -n "${CPU_DRY_RUN:-}" ]; then
  dev=cpu prec=fp32 preset=micro minutes=0.3 more=0.45 bench="--cpu-check" n_train=600 n_test=200 res=16
else
  dev=cuda prec=bf16 preset=igpt-s minutes=2 more=3 bench="--steps 10" n_train=5000 n_test=1000 res=32
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
fi
$py -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
$py -c "import transformers; print('transformers', transformers.__version__)" 2>/dev/null || echo "no transformers"

stage "1/6 CUDA-marked tests"
run 200 $py -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider -rs 2>&1 | tail -40

stage "2/6 benchmarks/bench_gpu.py (igpt-s shape, bf16, compile; HF ImageGPT beside it)"
run 240 $py benchmarks/bench_gpu.py $bench --out "$OUT/bench_gpu.json"

stage "3/6 synthetic ${res}x${res} set, K=512 grid palette"
run 120 $py benchmarks/synthetic_set.py "$WORK/src" --train $n_train --test $n_test --resolution $res
run 120 $py -m igpt prepare npz --data-dir "$WORK/src/synthetic.npz" --palette "$WORK/src/palette_rgb512.npy" \
  --out "$WORK/data"

stage "4/6 pretrain $preset, $dev $prec, compiled, $minutes min; then --resume to $more min"
common=(--device $dev --precision $prec --compile --batch-size 64 --eval-interval 200 --eval-images 500
        --no-progress)
run 200 $py -m igpt pretrain --data "$WORK/data" --out "$WORK/run" --preset $preset --minutes $minutes "${common[@]}"
run 150 $py -m igpt pretrain --data "$WORK/data" --out "$WORK/run" --minutes $more --resume "${common[@]}"
cp "$WORK/run/summary.json" "$OUT/pretrain_summary.json" 2>/dev/null
cp "$WORK/run/metrics.jsonl" "$OUT/pretrain_metrics.jsonl" 2>/dev/null
[ -n "${CPU_DRY_RUN:-}" ] || nvidia-smi --query-gpu=memory.used --format=csv

stage "5/6 probe on $dev"
run 150 $py -m igpt probe "$WORK/run" --device $dev --batch-size 256
cp "$WORK/run/probe.json" "$OUT/probe.json" 2>/dev/null

stage "6/6 sample on $dev"
run 90 $py -m igpt sample "$WORK/run" --out "$OUT/samples.png" --device $dev --count 4 --num 4
rm -rf "$WORK"
echo "=== $(date +%T) done; results in $OUT"
