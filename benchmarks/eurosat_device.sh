#!/usr/bin/env bash
# EuroSAT runs on a GPU machine lent through the `device` tool, which takes at most 64 MiB per call
# and reaches no package registry: the 92 MB npz travels in parts over two calls on one warm machine,
# and flwr (without Ray, which alone is larger) as wheels. Runs go through benchmarks/inprocess.py.
# Prepared here:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl flwr==1.42.0 flwr-datasets ...
#   split -b 40000000 ../shared/data/eurosat/eurosat_rgb_jpeg.npz .dev/npz.part-   # aa, ab, ac
# Stage 1, carry .whl .dev/tiny.npz .dev/npz.part-aa:  benchmarks/eurosat_device.sh setup
# Stage 2, carry .dev/npz.part-ab .dev/npz.part-ac:     benchmarks/eurosat_device.sh run SHA256 [precision ...]
# Each run dir comes back as $OUT/<precision>-gpu.tar (without checkpoints), its log as $OUT/<precision>.log.
set -euo pipefail
[ "${1:-}" = setup ] || { [ "${1:-}" = run ] && [ -n "${2:-}" ]; } || { echo "usage: $0 setup | run SHA256 [precision ...]" >&2; exit 2; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
case "$1" in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    mkdir -p /tmp/eurosat && cp .dev/npz.part-aa /tmp/eurosat/
    nvidia-smi -L
    python3 benchmarks/inprocess.py configs/eurosat-fp16.toml --data .dev/tiny.npz --output-dir /tmp/smoke \
      --run-name smoke --set num-server-rounds=2 --set max-eval-samples=64
    ;;
  run)
    npz=/tmp/eurosat/eurosat_rgb_jpeg.npz
    cat /tmp/eurosat/npz.part-aa .dev/npz.part-ab .dev/npz.part-ac >"$npz"
    echo "$2  $npz" | sha256sum -c
    shift 2
    precisions=("$@")
    [ ${#precisions[@]} -gt 0 ] || precisions=(fp16 fp32)
    for p in "${precisions[@]}"; do
      # A guard, not the plan: the time limit stops between rounds and still saves the results.
      python3 benchmarks/inprocess.py "configs/eurosat-$p.toml" --data "$npz" --output-dir /tmp/runs \
        --run-name "$p-gpu" --set "time-limit-minutes=${LIMIT_MINUTES:-4.0}" 2>&1 | tee "$OUT/$p.log"
      tar -C /tmp/runs --exclude=checkpoint -cf "$OUT/$p-gpu.tar" "$p-gpu"
    done
    ;;
  *) echo "usage: $0 setup | run SHA256 [precision ...]" >&2; exit 2 ;;
esac
