#!/usr/bin/env bash
# Lint the gRPC API in proto/ with buf (rules in proto/buf.yaml: STANDARD + COMMENTS) and check
# that it is formatted as `buf format` would write it.
#
# buf comes from npm (@bufbuild/buf, which ships the prebuilt binary) into a temporary folder.
# Variables: BUF (a buf binary to use instead), BUF_VERSION (the npm version, default below).
set -euo pipefail
cd "$(dirname "$0")/.."

BUF_VERSION="${BUF_VERSION:-1.75.0}"
if [[ -z "${BUF:-}" ]]; then
  if ! command -v npm >/dev/null; then
    echo "buf_lint: npm is needed to install buf (or set BUF to a buf binary)" >&2
    exit 1
  fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  npm install --prefix "$tmp" --no-audit --no-fund --loglevel=error "@bufbuild/buf@$BUF_VERSION" >/dev/null
  BUF="$tmp/node_modules/.bin/buf"
fi
echo "buf_lint: buf $("$BUF" --version)"
"$BUF" lint proto
"$BUF" format --diff --exit-code proto
echo "buf_lint: proto/ is lint-clean and formatted"
