#!/usr/bin/env bash
# A protocol for every method, through `flwr run` (atlas-run).
# Results: $OUT/<label>-s<seed>/ ; tables: the atlas-report commands in docs/results.md.
# Usage: [SEED=43] [CONFIG=configs/protocol.toml] [OUT=benchmarks/results/protocol] benchmarks/protocol.sh [label ...]
#   (default: every label of the v1 protocol below, seed 42). Runs write to <label>-s<seed>/ (the v1 and
#   quality runs made before that rule were renamed to it).
#   CONFIG=none runs the default config (pyproject.toml), as `atlas-run` with no config file does.
# A label is a method, or a method with switches changed; each --set of a label is one word of extra[label].
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$PWD/benchmarks/results/protocol}
config=${CONFIG:-configs/protocol.toml}
declare -A extra=(
  [centralized]=""
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
  # Quality levers (issue 17) on the default config (CONFIG=none), each one switch away from its method.
  [atlas+server-lr-1]="server-lr=1.0"
  [atlas+server-lr-2]="server-lr=2.0"
  [atlas-no-laplacian+server-lr-1]="server-lr=1.0"
  [atlas-no-laplacian+server-lr-2]="server-lr=2.0"
  [fedavg-cluster+server-lr-1]="server-lr=1.0"
  [fedavg-cluster+server-lr-2]="server-lr=2.0"
  [atlas+drop]="frozen-layers=\"drop\""
  # Protocol v2 (CONFIG=configs/protocol-v2.toml): the memory-feasible baselines and the aggregation table.
  [homlora]=""
  [hetlora]=""
  [flexlora]=""
  [atlas-no-laplacian+svd-dense]="aggregation=\"svd-dense\""
  [fedavg-cluster+drop]="over-budget=\"drop\""
  # The Laplacian after the protocol v2 runs (HEAD's defaults): the cluster graph over untruncated group means.
  [atlas+graph-cluster+aggregate]="laplacian-graph=\"cluster\" laplacian-input=\"aggregate\""
  # Client-level DP on updates and fingerprints (issue 20): z = 1 on both, epsilon 10.7 at delta 1e-5 over 3 rounds.
  [atlas+graph-cluster+aggregate+dp-z1]="laplacian-graph=\"cluster\" laplacian-input=\"aggregate\" dp-clip=1.0 dp-noise=1.0 fingerprint-noise=1.0"
  # The Laplacian lever: the graph's bandwidth from the pairs inside a group (commit after d592403).
  [atlas+graph-cluster]="laplacian-graph=\"cluster\""
  [atlas+eta-0.1]="laplacian-eta=0.1"
  # The QNLI lever: two local epochs for QNLI's clients, and for its centralized reference alike.
  [atlas-no-laplacian+qnli-epochs-2]="local-epochs-by-task=\"qnli:2\""
  [centralized+qnli-epochs-2]="local-epochs-by-task=\"qnli:2\""
  [fedavg-cluster+qnli-epochs-2]="local-epochs-by-task=\"qnli:2\""
  [atlas+graph-cluster+aggregate+qnli-epochs-2]="laplacian-graph=\"cluster\" laplacian-input=\"aggregate\" local-epochs-by-task=\"qnli:2\""
  # The default config with twice the rows (CONFIG=none, issue 17): QNLI alone at 1,536 rows a client reached
  # 0.761 against 0.641 at 768 and 0.714 with two epochs over 768 (benchmarks/quality_qnli.sh, seed 42).
  [atlas+rows-1536]="max-samples-per-client=1536"
  [fedavg-cluster+rows-1536]="max-samples-per-client=1536"
  [centralized+rows-1536]="max-samples-per-client=1536"
  # Where CoLA's gap to centralized comes from (protocol v2): the same run with no device limits (every client
  # fits rank 16 on every layer, as the centralized reference trains), so the budget's share shows apart.
  [atlas+graph-cluster+aggregate+no-devices]="laplacian-graph=\"cluster\" laplacian-input=\"aggregate\" rank-tiers=\"\" device-scale=1.0"
  # All four phases (issue 18): atlas-split (split = auto) with the Laplacian as atlas now has it.
  [atlas-split+graph-cluster+aggregate]="laplacian-graph=\"cluster\" laplacian-input=\"aggregate\""
  # A CoLA lever: two local epochs a round for CoLA's clients (its MCC still rises at round 3 in every run).
  [atlas+graph-cluster+aggregate+cola-epochs-2]="laplacian-graph=\"cluster\" laplacian-input=\"aggregate\" local-epochs-by-task=\"cola:2\""
  # The server step by rule (strategies/drift.py): each group's mean update scaled back to its members' mean length.
  [atlas+graph-cluster+aggregate+keep-length]="laplacian-graph=\"cluster\" laplacian-input=\"aggregate\" server-lr-rule=\"keep-length\""
  # Protocol v3 (CONFIG=configs/protocol-v3.toml, the Laplacian at the package defaults): the one-switch ablations
  # of atlas (exact aggregation, train what fits, the server step by rule) and the rule on the best baseline.
  [atlas+zero-pad]="aggregation=\"zero-pad\""
  [atlas+keep-length]="server-lr-rule=\"keep-length\""
  [fedavg-cluster+keep-length]="server-lr-rule=\"keep-length\""
  # Five tasks (issue 20): does the MRPC+RTE merge that learned clustering makes help or hurt them? Against
  # the task labels (oracle). CoLA at the 768 rows of the others (a run of about 6 min).
  [atlas+graph-cluster+aggregate+5-tasks]="laplacian-graph=\"cluster\" laplacian-input=\"aggregate\" tasks=\"sst2,mrpc,cola,qnli,rte\" max-samples-by-task=\"\""
  [atlas+graph-cluster+aggregate+5-tasks+oracle]="laplacian-graph=\"cluster\" laplacian-input=\"aggregate\" tasks=\"sst2,mrpc,cola,qnli,rte\" max-samples-by-task=\"\" clustering=\"oracle\""
)
order=(local-only fedavg fedavg-cluster atlas-no-laplacian atlas atlas-no-laplacian+zero-pad atlas-no-laplacian+factor-avg
  fedavg-cluster+split-auto fedavg+fp16 fedavg+int8)
labels=("$@")
[ ${#labels[@]} -gt 0 ] || labels=("${order[@]}")
for label in "${labels[@]}"; do
  [ -v "extra[$label]" ] || { echo "unknown label $label: expected one of ${!extra[*]}" >&2; exit 2; }
  method=${label%%+*}
  seed=${SEED:-42}
  name="$label-s$seed"
  sets=(--set "strategy=\"$method\"" --set "output-dir=\"$out\"" --set "run-name=\"$name\"" --set "seed=$seed")
  read -ra words <<< "${extra[$label]}"
  for word in "${words[@]}"; do sets+=(--set "$word"); done
  files=()
  [ "$config" = none ] || files=("$config")
  rm -rf "${out:?}/$name"
  start=$(date +%s)
  atlas-run "${files[@]}" "${sets[@]}"
  echo "$name: $(( $(date +%s) - start )) s end to end (atlas-run)" | tee "$out/$name/wall-clock.txt"
done
