#!/usr/bin/env bash
# The GPU check, one short script (sized to stay under 8 minutes on one H100 / H200, not yet run on one;
# nothing is downloaded):
#   1. the CUDA tests (tests/test_cuda.py, compile tests included),
#   2. the FlowAR parity tool on CUDA, when a checkout of the authors' code is given,
#   3. the sampling benchmark of FlowAR-S at batch 1 and 64, fp32 and bf16, compile off and on, then with a
#      flow-map head at 2 unguided jumps per scale (a distilled few-step FlowAR-S's cost),
#   4. the training benchmark of FlowAR-S at batch 64, fp32 and bf16, compile off and on;
#   with a checkout, 3 and 4 also time the authors' code beside ours (tools.bench_reference).
#
#   bash tools/gpu_check.sh                     # steps 1, 3, 4
#   bash tools/gpu_check.sh /path/to/FlowAR     # and step 2, and the authors' code in 3 and 4
#                                               # (wangqiang9/FlowAR; needs timm importable)
#
# It runs from any directory: it changes to the repository root, where the tools package is.
#
# Every table is printed with the device's name; the numbers go into the README's GPU table.
set -euo pipefail
reference="${1:-}"
if [ -n "$reference" ]; then reference="$(cd "$reference" && pwd)"; fi  # a relative path, before the cd
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: torch sees no CUDA device')"
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"

echo "== 1. CUDA tests"
python -m pytest tests/test_cuda.py -m "slow or not slow" -q

if [ -n "$reference" ]; then
  echo "== 2. parity with the authors' FlowAR-S on CUDA"
  python -m tools.parity_flowar --reference "$reference" --preset flowar-s --batch 4
else
  echo "== 2. parity skipped: no reference checkout given"
fi

# With a checkout, the benchmarks run beside the authors' code (tools.bench_reference: same weights,
# interleaved, one process; its table holds our rows too), else on their own.
sample_options=(--preset flowar-s --batch 1,64 --precision fp32,bf16 --compile off,on --device cuda --repeats 3)
train_options=(--preset flowar-s --batch 64 --precision fp32,bf16 --compile off,on --device cuda)

echo "== 3. sampling benchmark"
if [ -n "$reference" ]; then
  python -m tools.bench_reference sample --reference "$reference" "${sample_options[@]}"
else
  python -m eval.bench_sample "${sample_options[@]}"
fi

echo "== 3b. sampling benchmark, a flow-map head: 2 unguided jumps per scale"
fewstep_options=(--preset flowar-s --batch 1,64 --precision fp32,bf16 --device cuda --repeats 3
                 --solver flow-map --schedule uniform --steps 2 --guidance-scale 1)
if [ -n "$reference" ]; then
  python -m tools.bench_reference sample --reference "$reference" "${fewstep_options[@]}"
else
  python -m eval.bench_sample "${fewstep_options[@]}"
fi

echo "== 4. training benchmark"
if [ -n "$reference" ]; then
  python -m tools.bench_reference train --reference "$reference" "${train_options[@]}"
else
  python -m train.bench "${train_options[@]}"
fi
