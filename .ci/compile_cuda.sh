#!/usr/bin/env bash
# Compile -- not run -- the CUDA kernels of gramstyle.kernels._C, so that they cannot rot on
# machines without a GPU. Builds into a temporary directory (the in-place CPU build in
# kernels/ is left alone), then checks that the library holds sm_XX code for the kernels
# and that loading it registers the CUDA implementations of the gramstyle ops.
#
# Variables: PYTHON (default .venv/bin/python if present, else python), CUDA_HOME
# (default: found by setup.py, e.g. /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default 9.0,
# one architecture keeps this to a few minutes), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
export FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
start=$(date +%s)
"$PYTHON" setup.py build_ext --build-temp "$out/tmp" --build-lib "$out/lib"
so="$(find "$out/lib" -name '_C*.so' | head -n 1)"
[[ -n "$so" ]] || { echo "compile_cuda: no extension was built" >&2; exit 1; }

# The kernels must be in the library as device code, not just declared. (Outputs are
# captured first: `cmd | grep -q` would trip pipefail when grep exits early.)
sections="$(readelf -S --wide "$so")"
grep -q "nv_fatbin" <<<"$sections" || { echo "compile_cuda: no device code in $so" >&2; exit 1; }
symbols="$(nm -C "$so")"
for kernel in residual_epilogue_kernel gram_epilogue_kernel symmetrise_kernel; do
  grep -q "$kernel" <<<"$symbols" || { echo "compile_cuda: $kernel missing" >&2; exit 1; }
done

# Loading needs no GPU: check that the CUDA implementations are registered.
"$PYTHON" - "$so" <<'PY'
import sys

import torch

torch.ops.load_library(sys.argv[1])
for op in ("gram", "gram_backward", "style_loss", "style_loss_backward"):
    for key in ("CPU", "CUDA"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"gramstyle::{op}", key):
            sys.exit(f"compile_cuda: gramstyle::{op} has no {key} kernel")
print("compile_cuda: CPU and CUDA kernels registered for all four ops")
PY
echo "compile_cuda: built $(basename "$so") for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST in $(( $(date +%s) - start )) s"
