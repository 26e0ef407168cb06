#!/usr/bin/env bash
# Where the federated-to-centralized gap on CoLA comes from (issue 17): protocol v2's CoLA data (2 clients,
# every train row: 4,275 each) and LoRA (rank 16, alpha 32), alone and with no device limit (device-scale 1,
# no rank caps: the no-devices run showed the budget is not the gap), 3 rounds of 1 epoch, max length 64,
# evaluated on all 1,043 validation rows. One switch changed per run, in process (benchmarks/inprocess.py:
# the real ServerApp and ClientApp, no Ray), about 3 min a run on 2 cores.
# Results: benchmarks/results/quality-cola/<name>-s<seed>/ ; usage: [SEED=43] benchmarks/quality_cola.sh [name ...]
set -euo pipefail
cd "$(dirname "$0")/.."
out="$PWD/benchmarks/results/quality-cola"
declare -A sets=(
  [centralized]="strategy=centralized"
  [fedavg]="strategy=fedavg"
  [exact]="strategy=fedavg aggregation=exact"
  # As many AdamW steps a round per client as the centralized model takes per epoch.
  [fedavg-epochs2]="strategy=fedavg local-epochs=2"
  [centralized-rounds6]="strategy=centralized num-server-rounds=6"
  [fedavg-rounds6]="strategy=fedavg num-server-rounds=6"
  [fedavg-cosine]="strategy=fedavg lr-schedule=cosine"
  [fedavg-lr2]="strategy=fedavg lr=0.002"
  # A server step that gives the mean update a client's step length back (1 / update-kept, about 1.4 on CoLA).
  [fedavg-slr1.4]="strategy=fedavg server-lr=1.4"
  [exact-slr1.4]="strategy=fedavg aggregation=exact server-lr=1.4"
  # The same length given back by rule, per group and round (server-lr-rule = keep-length: 1 / update-kept, <= sqrt(n)).
  [exact-keep]="strategy=fedavg aggregation=exact server-lr-rule=keep-length"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(centralized fedavg exact fedavg-epochs2)
# shellcheck source=benchmarks/inprocess_sweep.sh
source benchmarks/inprocess_sweep.sh
sweep "$out" 'tasks="cola" clients-per-task=2 max-samples-per-client=4275 max-eval-samples=1043 num-server-rounds=3 lora-rank=16 lora-alpha=32 device-scale=1.0 rank-tiers=""' "${names[@]}"
