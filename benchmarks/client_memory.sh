#!/usr/bin/env bash
# The measured working memory of every client, fingerprints and evaluation included (issue 18 item 2):
# `atlas` (budget ranks) and `atlas-split` (all four phases) on protocol v2's devices, one round on few rows
# (peak memory depends on the batch and the plan, not on how many rows a client holds), through `flwr run`
# with measure-memory = true. glibc malloc is pinned as benchmarks/memory_calibration.py pins it, so that the
# resident set follows the live bytes. Results: $OUT/<method>-s42/memory-clients.csv (and memory.csv).
# Usage: [OUT=benchmarks/results/client-memory] benchmarks/client_memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$PWD/benchmarks/results/client-memory}
export MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072
for method in atlas atlas-split; do
  rm -rf "${out:?}/$method-s42"
  atlas-run configs/protocol-v2.toml --set "strategy=\"$method\"" --set "output-dir=\"$out\"" \
    --set "run-name=\"$method-s42\"" --set seed=42 --set measure-memory=true --set num-server-rounds=1 \
    --set max-samples-per-client=64 --set 'max-samples-by-task=""' --set max-eval-samples=128 \
    --set 'laplacian-graph="cluster"' --set 'laplacian-input="aggregate"'
done
