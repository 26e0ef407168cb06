#!/usr/bin/env bash
# The EuroSAT baseline of docs/eurosat.md: FedAvg, 10 IID clients, one run per precision through `flwr run`
# (atlas-run), then atlas-ptq on the fp32 run's final model, then the tables and the figure.
# Results: benchmarks/results/eurosat/<precision>/ and benchmarks/results/eurosat/ptq/ (models are not committed).
# Usage: benchmarks/eurosat.sh [precision ...]   (default: fp32 fp16 int8; ptq runs when fp32 is among them)
set -euo pipefail
cd "$(dirname "$0")/.."
out="$PWD/benchmarks/results/eurosat"
precisions=("$@")
[ ${#precisions[@]} -gt 0 ] || precisions=(fp32 fp16 int8)
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
for precision in "${precisions[@]}"; do
  # The committed results are regenerated, not appended to: git keeps the old ones.
  rm -rf "${out:?}/$precision"
  start=$(date +%s)
  # One thread per client, two clients at once: OpenMP barriers stall under any other load, one thread does not.
  atlas-run "configs/eurosat-$precision.toml" --client-cpus 1 --set "output-dir=\"$out\"" --set "run-name=$precision"
  echo "$precision: $(( $(date +%s) - start )) s end to end (atlas-run, including SuperLink start and stop)" \
    | tee "$out/$precision/wall-clock.txt"
done
if [[ " ${precisions[*]} " == *" fp32 "* ]]; then
  rm -rf "${out:?}/ptq"
  atlas-ptq "$out/fp32/model.safetensors" --output-dir "$out/ptq"
fi
python benchmarks/eurosat_table.py "$out"
