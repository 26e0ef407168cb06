# shellcheck shell=bash
# The run loop of the one-task sweeps (quality_cola.sh, quality_qnli.sh), sourced by them: one in-process run
# (benchmarks/inprocess.py) per name, each the sweep's fixed switches plus the name's own.
# Usage, after `declare -A sets=([name]="key=value ...")`: sweep OUT "fixed --set words" name ...
# Writes OUT/<name>-s<seed>/ (SEED, default 42) and removes its checkpoint folder (not a result).
sweep() {
  local out=$1 name word seed run
  local -a fixed args words
  read -ra fixed <<< "$2"
  shift 2
  for name in "$@"; do
    [ -v "sets[$name]" ] || { echo "unknown run $name: expected one of ${!sets[*]}" >&2; exit 2; }
    args=()
    for word in "${fixed[@]}"; do args+=(--set "$word"); done
    read -ra words <<< "${sets[$name]}"
    for word in "${words[@]}"; do args+=(--set "$word"); done
    seed=${SEED:-42}
    run="$name-s$seed"
    rm -rf "${out:?}/$run"
    python benchmarks/inprocess.py configs/smoke.toml --output-dir "$out" --run-name "$run" --set "seed=$seed" "${args[@]}"
    rm -rf "${out:?}/$run/checkpoint"
  done
}
