#!/usr/bin/env bash
# Render each kustomize overlay under deploy/k8s/overlays with `kubectl kustomize` and
# validate the result against the Kubernetes schemas (kubernetes-validate --strict, for the
# oldest version we target and the newest the validator knows), then check the deployment
# rules a schema cannot express (.ci/check_k8s.py). Without kubectl (or kustomize) the
# overlays cannot be rendered: the base's plain manifests are validated instead, and the
# script says so.
#
# Variables: PYTHON (default .venv/bin/python if present, else python3); KUBECTL.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" -m pip install -q "kubernetes-validate==1.37.0"
# Native gRPC probes are GA since Kubernetes 1.27; 1.37 is the validator's newest schema.
versions=(1.28.0 1.37.0)

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
KUBECTL="${KUBECTL:-$(command -v kubectl || true)}"
if [[ -n "$KUBECTL" ]]; then
  render=("$KUBECTL" kustomize)
elif command -v kustomize >/dev/null; then
  render=(kustomize build)
else
  render=()
fi

files=()
if (( ${#render[@]} )); then
  for overlay in deploy/k8s/overlays/*/; do
    name="$(basename "$overlay")"
    "${render[@]}" "$overlay" > "$out/$name.yaml"
    files+=("$out/$name.yaml")
    echo "k8s_validate: rendered $overlay: $(grep -c '^kind:' "$out/$name.yaml") objects"
  done
else
  echo "k8s_validate: neither kubectl nor kustomize is installed: the overlays are NOT" \
       "rendered; validating the base's plain manifests only" >&2
  for file in deploy/k8s/base/*.yaml; do
    case "$(basename "$file")" in
      # kustomize's own file, and objects of CRDs the validator has no schema for.
      kustomization.yaml|servicemonitor.yaml|certificate.yaml) ;;
      *) files+=("$file") ;;
    esac
  done
fi
for version in "${versions[@]}"; do
  "$PYTHON" -m kubernetes_validate --strict --quiet -k "$version" "${files[@]}"
  echo "k8s_validate: ${#files[@]} files valid for Kubernetes $version (--strict)"
done
if (( ${#render[@]} )); then
  "$PYTHON" .ci/check_k8s.py "${files[@]}"
fi
