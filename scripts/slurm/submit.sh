#!/usr/bin/env bash
# Submit an ATLAS-FL run to SLURM.
#
# Usage: scripts/slurm/submit.sh [options] <config.toml> [KEY=VALUE ...]
#
#   --mode sim|deploy   sim (default): one job, atlas-run on the simulation engine.
#                       deploy: one job for the SuperLink (TLS, SuperNode authentication)
#                       and a job array of SuperNodes that connect to it.
#   --account NAME      SLURM account (default: none, the cluster's default)
#   --partition NAME    SLURM partition (default: none, the cluster's default)
#   --time D-HH:MM:SS   time limit of each job (default: 01:00:00)
#   --cpus N            CPUs per job (default: 2)
#   --mem SIZE          memory per job, e.g. 16G (default: the cluster's default)
#   --gpus N            GPUs per job (sim) or per SuperNode (deploy) (default: 0)
#   --client-cpus N     sim: CPUs per simulated ClientApp (default: 1)
#   --client-gpus F     sim: GPUs per simulated ClientApp (default: 0)
#   --memory LIST       deploy: SuperNode memory budgets, cycled, e.g. 2GB,4GB (default: by partition id)
#   --output DIR        results root; each job writes to DIR/<job id> (default: ./outputs/slurm)
#   --dry-run           print the sbatch commands, submit nothing
#
# KEY=VALUE pairs override run-config keys (atlas-run --set), e.g. num-server-rounds=5
# 'tasks="sst2,cola"'. The project's venv must be active: its atlas-run and atlas-deploy
# are what the jobs run.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
app="$(cd "$here/../.." && pwd)"

die() {
    echo "submit.sh: $*" >&2
    exit 2
}
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

mode=sim account="" partition="" time_limit=01:00:00 cpus=2 mem="" gpus=0
client_cpus=1 client_gpus=0 memory="" output="$PWD/outputs/slurm" dry_run=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --dry-run) dry_run=1; shift; continue ;;
        --) shift; break ;;
        -*) [[ $# -ge 2 ]] || die "option $1 needs a value: see --help" ;;
        *) break ;;
    esac
    case "$1" in
        --mode) mode="$2" ;;
        --account) account="$2" ;;
        --partition) partition="$2" ;;
        --time) time_limit="$2" ;;
        --cpus) cpus="$2" ;;
        --mem) mem="$2" ;;
        --gpus) gpus="$2" ;;
        --client-cpus) client_cpus="$2" ;;
        --client-gpus) client_gpus="$2" ;;
        --memory) memory="$2" ;;
        --output) output="$2" ;;
        *) die "unknown option $1: see --help" ;;
    esac
    shift 2
done

[[ $mode == sim || $mode == deploy ]] || die "--mode $mode is invalid: expected sim or deploy"
[[ $cpus =~ ^[1-9][0-9]*$ ]] || die "--cpus $cpus is invalid: expected a positive integer"
[[ $gpus =~ ^[0-9]+$ ]] || die "--gpus $gpus is invalid: expected an integer >= 0"
[[ $client_cpus =~ ^[1-9][0-9]*$ ]] || die "--client-cpus $client_cpus is invalid: expected a positive integer"
[[ $client_gpus =~ ^[0-9]*\.?[0-9]+$ ]] || die "--client-gpus $client_gpus is invalid: expected a number >= 0"
[[ $time_limit =~ ^[0-9]+(-[0-9]+)?(:[0-9]+){0,2}$ ]] || die "--time $time_limit is invalid: expected [D-]HH:MM:SS"
[[ $# -ge 1 ]] || die "no config file given: usage: submit.sh [options] <config.toml> [KEY=VALUE ...]"
[[ -f $1 ]] || die "config file $1 not found: expected a TOML file of run-config keys"
config="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
shift
for kv in "$@"; do
    [[ $kv =~ ^[a-z0-9-]+=.+ ]] || die "override $kv is invalid: expected KEY=VALUE (a run-config key)"
done
atlas_run="$(command -v atlas-run)" || die "atlas-run is not on PATH: activate the project's venv first"
bin_dir="$(dirname "$atlas_run")"
mkdir -p "$output"
output="$(cd "$output" && pwd)"

# Validate the whole config before anything waits in a queue (atlas-run --check exits 2 on bad input).
sets=()
for kv in "$@"; do sets+=(--set "$kv"); done
"$atlas_run" "$config" --app "$app" "${sets[@]}" --check >/dev/null

common=(--time "$time_limit" --cpus-per-task "$cpus")
[[ -z $account ]] || common+=(--account "$account")
[[ -z $partition ]] || common+=(--partition "$partition")
[[ -z $mem ]] || common+=(--mem "$mem")

# Jobs get the submitting environment (sbatch's default --export=ALL) plus these ATLAS_* variables,
# set through env rather than --export=..., whose commas would split values such as 2GB,4GB.
submit() { # submit VAR=VALUE... -- SBATCH_ARGS...
    local envs=()
    while [[ $1 != -- ]]; do
        envs+=("$1")
        shift
    done
    shift
    if ((dry_run)); then
        printf '%q ' env "${envs[@]}" sbatch "$@" >&2
        echo >&2
        echo DRYRUN
    else
        env "${envs[@]}" sbatch --parsable "$@"
    fi
}

gres=()
((gpus == 0)) || gres=(--gres "gpu:$gpus")
if [[ $mode == sim ]]; then
    job=$(submit "ATLAS_BIN=$bin_dir" "ATLAS_APP=$app" "ATLAS_OUTPUT=$output" "ATLAS_CLIENT_CPUS=$client_cpus" \
        "ATLAS_CLIENT_GPUS=$client_gpus" -- "${common[@]}" "${gres[@]}" --job-name atlas-sim \
        --output "$output/slurm-%j.out" "$here/sim.sbatch" "$config" "$@")
    echo "submitted job ${job%%;*}: results in $output/${job%%;*}, log $output/slurm-${job%%;*}.out"
    exit 0
fi

# Deploy: the SuperNodes find the SuperLink through files in this shared folder.
fed="$output/deploy-$(date +%Y%m%d-%H%M%S)-$$"
((dry_run)) || mkdir -p "$fed"
num=$("$bin_dir/python" - "$config" "$app" "$@" <<'PY'
import sys
from pathlib import Path

from atlas_tools.cli import resolve_run_config
from atlas_flwr.common.config import Config

values = resolve_run_config(Path(sys.argv[2]), Path(sys.argv[1]), sys.argv[3:])
print(Config.from_run_config(values).num_clients)
PY
)
link=$(submit "ATLAS_BIN=$bin_dir" "ATLAS_APP=$app" "ATLAS_FEDERATION=$fed" "ATLAS_MEMORY=$memory" -- \
    "${common[@]}" --job-name atlas-superlink --output "$fed/superlink-%j.out" \
    "$here/superlink.sbatch" "$config" "$@")
nodes=$(submit "ATLAS_BIN=$bin_dir" "ATLAS_FEDERATION=$fed" -- "${common[@]}" "${gres[@]}" \
    --job-name atlas-supernode --array "0-$((num - 1))" --output "$fed/supernode-%A_%a.out" "$here/supernode.sbatch")
echo "submitted SuperLink job ${link%%;*} and SuperNode array ${nodes%%;*} ($num tasks): results in $fed"
