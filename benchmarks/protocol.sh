#!/usr/bin/env bash
# The CPU protocol (configs/protocol.toml) for every method, through `flwr run` (atlas-run).
# Results: benchmarks/results/protocol/<label>/ ; tables: the atlas-report command in the README
# Usage: [SEED=43] benchmarks/protocol.sh [label ...]   (default: all labels below, seed 42)
# A seed other than 42 writes to <label>-s<seed>/.
# A label is a method, or a method with one switch changed (exact vs zero-pad vs factor-avg aggregation).
set -euo pipefail
cd "$(dirname "$0")/.."
out="$PWD/benchmarks/results/protocol"
declare -A extra=(
  [local-only]=""
  [fedavg]=""
  [fedavg-cluster]=""
  [atlas-no-laplacian]=""
  [atlas]=""
  [atlas-no-laplacian+zero-pad]="aggregation=\"zero-pad\""
  [atlas-no-laplacian+factor-avg]="aggregation=\"factor-avg\""
  [fedavg-cluster+split-auto]="split=\"auto\""
  [fedavg+fp16]="precision=\"fp16\""
  [fedavg+int8]="precision=\"int8\""
)
order=(local-only fedavg fedavg-cluster atlas-no-laplacian atlas atlas-no-laplacian+zero-pad atlas-no-laplacian+factor-avg
  fedavg-cluster+split-auto fedavg+fp16 fedavg+int8)
labels=("$@")
[ ${#labels[@]} -gt 0 ] || labels=("${order[@]}")
for label in "${labels[@]}"; do
  [ -v "extra[$label]" ] || { echo "unknown label $label: expected one of ${order[*]}" >&2; exit 2; }
  method=${label%%+*}
  seed=${SEED:-42}
  name=$label
  [ "$seed" = 42 ] || name="$label-s$seed"
  sets=(--set "strategy=\"$method\"" --set "output-dir=\"$out\"" --set "run-name=\"$name\"" --set "seed=$seed")
  [ -z "${extra[$label]}" ] || sets+=(--set "${extra[$label]}")
  rm -rf "${out:?}/$name"
  start=$(date +%s)
  atlas-run configs/protocol.toml "${sets[@]}"
  echo "$name: $(( $(date +%s) - start )) s end to end (atlas-run)" | tee "$out/$name/wall-clock.txt"
done
