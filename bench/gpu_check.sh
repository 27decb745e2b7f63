#!/usr/bin/env bash
# The GPU check: everything a few minutes on a GPU must tell us, in one call.
#
#   bash bench/gpu_check.sh                    # on a CUDA machine (about 8 min on an H200)
#   GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh  # the same steps on the CPU at tiny sizes (CI)
#
# Steps (each one timed, its log kept; a failing step is reported and the next one runs):
#   1. build   the op with TORCH_CUDA_ARCH_LIST=9.0 (in place; smoke: check the CPU build loads)
#   2. tests   the kernel tests (tests/kernels/; the CUDA ones run on a GPU)
#   3. rates   the fused op vs einsum at S in {512, 1024, 2048}, fp32 / TF32 / bf16, fwd and
#              fwd+bwd, in TFLOP/s next to a plain GEMM measured on the spot
#   4. stylize Stylize at 512 px, 300 iterations, bf16 and fp32: seconds per iteration
#   5. syncs   host synchronisations inside optimiser steps (must be 0)
#   6. compile eager vs torch.compile'd extractor
#   7. ttq     bench/time_to_quality.py on one pair at 512 px
#
# Everything goes under one folder: $OUT when set (the device runner's), else
# bench/results/gpu_check-<date>[-smoke]. summary.md lists each step's status and time;
# each step's output is in <step>.log next to its JSON/Markdown.
#
# Variables: PYTHON (default .venv/bin/python if present, else python3), OUT, GPU_CHECK_SMOKE,
# GRAMSTYLE_SHARED (the shared images/models; default ../shared, else stand-in images are
# generated), MAX_JOBS (compile jobs; default: all cores), STEPS (default: all, e.g.
# "rates stylize").
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SMOKE="${GPU_CHECK_SMOKE:-0}"
stamp="$(date +%Y-%m-%d)"
OUT="${OUT:-bench/results/gpu_check-$stamp$([[ $SMOKE == 1 ]] && echo -smoke)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
STEPS="${STEPS:-build tests rates stylize syncs compile ttq}"

if [[ "$SMOKE" == 1 ]]; then
  DEVICE=cpu; SIZES="32"; SIZE=48; ITERS=8; TTQ_SIZE=64; TTQ_ITERS=26; PEAK=256; RUN=0.01
  COMPILE_PRECISIONS=fp32  # compiling costs about a minute per precision on 2 cores
  KERNEL_TESTS=(tests/kernels/ -q -x -k "cuda or CUDA")  # collected, skipped on CPU
else
  DEVICE=cuda; SIZES="512 1024 2048"; SIZE=512; ITERS=300; TTQ_SIZE=512; TTQ_ITERS=""
  PEAK=8192; RUN=0.1
  COMPILE_PRECISIONS="bf16 fp32"
  KERNEL_TESTS=(tests/kernels/ -q -rs)
fi

# The shared images (and the HED VGG16); stand-ins when this machine has none.
SHARED="${GRAMSTYLE_SHARED:-}"
if [[ -z "$SHARED" ]]; then
  for candidate in ../shared /work/shared; do
    if [[ -d "$candidate/images" ]]; then SHARED="$(cd "$candidate" && pwd)"; break; fi
  done
fi
if [[ -z "$SHARED" ]]; then
  SHARED="$OUT/shared"
  "$PYTHON" - "$SHARED" <<'PY'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root = Path(sys.argv[1]) / "images"
rng = np.random.default_rng(0)
names = {"content": ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"],
         "style": ["starry_night.jpg", "the_scream.jpg", "shipwreck.jpg",
                   "woman_with_a_hat.jpg"]}
for kind, files in names.items():
    (root / kind).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(files):
        y, x = np.mgrid[0:300, 0:451] / 60.0
        base = np.stack([np.sin(x * (i + 1) + y), np.cos(y * (i + 2) - x), np.sin(x * y)], -1)
        noise = rng.normal(0, 0.15, base.shape)
        pixels = ((base + noise + 1.5) / 3 * 255).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / kind / name)
print(f"gpu_check: no shared images found; stand-ins generated in {root}")
PY
fi
export GRAMSTYLE_SHARED="$SHARED"
HED="$SHARED/models/vgg16-hed-bsds500.pth"
if [[ -f "$HED" ]]; then MODEL=(--arch vgg16 --weights "$HED"); else MODEL=(--arch vgg19 --weights random); fi

{
  echo "# gramstyle GPU check ($([[ $SMOKE == 1 ]] && echo "smoke, CPU" || echo "$DEVICE"))"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), host $(hostname)"
  echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //') ($(nproc) cores)"
  if command -v nvidia-smi >/dev/null; then
    echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
  fi
  echo "- python: $("$PYTHON" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda)' 2>&1)"
  echo "- images: $SHARED; model: ${MODEL[*]}"
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---:|"
} > "$OUT/summary.md"

failed=0
step() {  # step NAME TIMEOUT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  if [[ " $STEPS " != *" $name "* ]]; then return 0; fi
  local start=$SECONDS status
  echo "== gpu_check: $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  status=$?
  tail -n 25 "$OUT/$name.log"
  local took=$((SECONDS - start)) verdict="ok"
  if [[ $status == 124 || $status == 137 ]]; then verdict="TIMED OUT"; failed=1
  elif [[ $status != 0 ]]; then verdict="FAILED (exit $status)"; failed=1; fi
  echo "| $name | $verdict | $took |" >> "$OUT/summary.md"
  echo "== gpu_check: $name $verdict in $took s"
}

build() {
  if [[ "$SMOKE" != 1 ]]; then
    if ! "$PYTHON" -c "import gramstyle.v1.gramstyle_pb2" 2>/dev/null; then
      (cd proto && "$PYTHON" -m grpc_tools.protoc -I. \
        -I"$("$PYTHON" -c 'import grpc_tools, os; print(os.path.dirname(grpc_tools.__file__))')/_proto" \
        --python_out=../src --pyi_out=../src --grpc_python_out=../src gramstyle/v1/gramstyle.proto) || return 1
      touch src/gramstyle/v1/__init__.py
    fi
    FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "$PYTHON" setup.py build_ext --inplace || return 1
    if ! "$PYTHON" -c "import gramstyle.server" 2>/dev/null; then
      "$PYTHON" -m pip install --no-deps --no-build-isolation -e . || return 1
    fi
  fi
  "$PYTHON" - "$DEVICE" <<'PY'
import sys

import torch

from gramstyle import kernels

device = sys.argv[1]
backend = kernels.backend(device)
print(f"torch {torch.__version__}, kernel backend on {device}: {backend}, "
      f"load error: {kernels.load_error()}")
if device == "cuda":
    print(f"GPU {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
sys.exit(0 if backend == device else 1)
PY
}

common=(--device "$DEVICE" --shared "$SHARED")
export PYTHON SMOKE DEVICE
export -f build
step build 420 bash -c build
step tests 300 "$PYTHON" -m pytest "${KERNEL_TESTS[@]}" --junitxml="$OUT/tests.xml"
# shellcheck disable=SC2086  # SIZES and COMPILE_PRECISIONS are lists
step rates 240 "$PYTHON" bench/gpu_check.py rates "${common[@]}" --out "$OUT" --sizes $SIZES \
  --peak-side "$PEAK" --min-run-time "$RUN" $([[ $SMOKE == 1 ]] && echo --rounds 1)
step stylize 240 "$PYTHON" bench/gpu_check.py stylize "${common[@]}" --out "$OUT" \
  --size "$SIZE" --iterations "$ITERS" --precisions bf16 fp32
step syncs 120 "$PYTHON" bench/gpu_check.py syncs "${common[@]}" --out "$OUT" --size "$SIZE" \
  --iterations 20
step compile 300 "$PYTHON" bench/gpu_check.py compile "${common[@]}" --out "$OUT" \
  --size "$SIZE" --precisions $COMPILE_PRECISIONS
step ttq 300 "$PYTHON" bench/time_to_quality.py --device "$DEVICE" "${MODEL[@]}" \
  --pairs chelsea:starry_night --sizes "$TTQ_SIZE" --configs old new nostop scales2 \
  --quiet-load 1000 --out "$OUT/time_to_quality" ${TTQ_ITERS:+--max-iterations "$TTQ_ITERS"}

if [[ -f "$OUT/syncs.json" ]] && ! "$PYTHON" -c "
import json, sys
r = json.load(open(sys.argv[1]))['results']
sys.exit(any(v['syncs_in_steps'] for v in r.values()))" "$OUT/syncs.json"; then
  echo "| syncs | FAILED: host synchronisations inside optimiser steps (see syncs.json) | |" >> "$OUT/summary.md"
  failed=1
fi
echo >> "$OUT/summary.md"
echo "Results: $OUT" >> "$OUT/summary.md"
cat "$OUT/summary.md"
exit $failed
