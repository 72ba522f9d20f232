#!/usr/bin/env bash
# Every benchmark, each writing its record under records/ (what docs/benchmarks.md renders), on an idle
# machine: nothing else running. ~40 min on 2 cores. Then `maskssd docs` and commit records/ with the pages.
#   bash benchmarks/record_all.sh             # all
#   bash benchmarks/record_all.sh inference_fps train_step    # some
# Two more need a trained model's checkpoint (CK=.../best.pt of the accurate recipe), so they are run by hand:
#   $PY -m benchmarks.realtime_decode --checkpoint $CK --backends onnx onnx-int8 --threads 2 --isa native avx2 \
#       --spinning --record records/bench_realtime_decode.json
#   $PY -m benchmarks.forward_parts --checkpoint $CK --threads 2 --isa native avx2 --record records/bench_forward_parts.json
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
declare -A ARGS=(
  [inference_fps]='--isa native avx2 --threads 2 --models cpu --backends "eager folded" "onnx folded" "onnx int8" --repeats 30'
  [train_step]='--cases tuned,avx2 --freeze-stages 3 --channels-last --profile'
  [train_loop]=''
  [loss_matching]=''
  [decode_nms]=''
  [eval_map]=''
  [bootstrap]=''
  [data_loading]=''
  [model_forward]=''
  [server_throughput]='--backend onnx --model-workers 2'
  [server_soak]='--requests 5000 --clients 4'
  [ddp_scaling]=''
)
ORDER=(inference_fps train_step train_loop loss_matching decode_nms eval_map bootstrap data_loading model_forward
       server_throughput server_soak ddp_scaling)
[ $# -gt 0 ] && ORDER=("$@")
failed=()
for b in "${ORDER[@]}"; do
  echo "=== $b $(date -u +%H:%M:%S)"
  if ! eval "$PY -m benchmarks.$b ${ARGS[$b]} --record records/bench_$b.json"; then failed+=("$b"); fi
done
[ ${#failed[@]} -eq 0 ] || { echo "failed: ${failed[*]}"; exit 1; }
