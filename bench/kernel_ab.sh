#!/usr/bin/env bash
# A/B timing of the fused op *without weights*: the kernels of an older commit against the
# working tree's, both compiled the same way (torch.utils.cpp_extension.load, -O3) and each
# timed by today's bench/bench_kernel.py in its own process (the two libraries register the
# same op names, so they cannot share one), in the order A B B A ... to spread drifting load.
#
#   bench/kernel_ab.sh [OLD_REV] [OUT]      # default: 8649923~1 (before issue 20's weights)
#
# Each process imports gramstyle.kernels from a copy under $WORK, shadowing the installed one
# through PYTHONPATH (bench_kernel.py imports nothing else of gramstyle). Extra arguments for
# bench_kernel.py go in $BENCH_ARGS.
set -euo pipefail
old_rev=${1:-8649923~1}
out=${2:-bench/results/kernel_ab}
work=${WORK:-$(mktemp -d)}
python=${PYTHON:-.venv/bin/python}
args=${BENCH_ARGS:---sizes 512 --dtypes fp32 --threads 1 --rounds 3 --min-run-time 0.3}
build() {  # $1: name, $2: git tree-ish or "WORKTREE"
  mkdir -p "$work/$1/gramstyle" "$work/$1-build"
  if [ "$2" = WORKTREE ]; then cp -r kernels "$work/$1/gramstyle/"; rm -f "$work/$1"/gramstyle/kernels/_C*.so
  else git archive "$2" kernels | tar -x -C "$work/$1/gramstyle"; fi
  touch "$work/$1/gramstyle/__init__.py"
  (cd "$work/$1" && "$OLDPWD/$python" -c "import torch.utils.cpp_extension as ce; ce.load(name='_C', \
    sources=['gramstyle/kernels/csrc/gram.cpp'], extra_cflags=['-O3'], \
    build_directory='$work/$1-build', is_python_module=False)")
  cp "$work/$1-build/_C.so" "$work/$1/gramstyle/kernels/_C$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
}
build old "$old_rev"
build new WORKTREE
mkdir -p "$out"
for run in old1 new1 new2 old2; do
  # shellcheck disable=SC2086
  PYTHONPATH="$work/${run%?}" "$python" bench/bench_kernel.py $args --out "$out" --name "$run" \
    | { grep -E "sum of|^target" || true; } | sed "s/^/$run /"
done
