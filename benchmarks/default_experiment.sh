#!/usr/bin/env bash
# The default experiment of the README, once per baseline strategy, through `flwr run`
# (atlas-run). Results: benchmarks/results/default/<strategy>-s42/ (rounds, clients, summary).
# Usage: [CONFIG=configs/default-768.toml] benchmarks/default_experiment.sh [strategy ...]   (default: fedavg
#   local-only). The committed table ran the default config of its time, 768 rows a client: CONFIG= that file.
set -euo pipefail
cd "$(dirname "$0")/.."
out="$PWD/benchmarks/results/default"
files=()
[ -z "${CONFIG:-}" ] || files=("$CONFIG")
strategies=("$@")
[ ${#strategies[@]} -gt 0 ] || strategies=(fedavg local-only)
for strategy in "${strategies[@]}"; do
  # The committed results are regenerated, not appended to: git keeps the old ones.
  name="$strategy-s42"
  rm -rf "${out:?}/$name"
  start=$(date +%s)
  atlas-run "${files[@]}" --set "strategy=$strategy" --set "output-dir=\"$out\"" --set "run-name=$name"
  echo "$name: $(( $(date +%s) - start )) s end to end (atlas-run, including SuperLink start and stop)" \
    | tee "$out/$name/wall-clock.txt"
done
