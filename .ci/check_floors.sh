#!/usr/bin/env bash
# The declared dependency floors really work: build the client-only wheel (an isolated build,
# so no torch and the pinned grpcio-tools), install it into a fresh venv together with EXACTLY
# the `>=` floors of its Requires-Dist (the base requirements, plus the grpcio-* packages of
# the `server` extra), then import the generated stubs and the client and make one gRPC call.
#
# Variables: PYTHON (the interpreter for the fresh venvs, default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)

# Build from a clean copy: an in-tree build would pick up build/ left by earlier builds.
mkdir "$tmp/src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done \
    | xargs -0 cp --parents -t "$tmp/src"
else
  tar -c --exclude=./.venv --exclude=./build --exclude='*.egg-info' --exclude='*.so' . \
    | tar -x -C "$tmp/src"
fi
"$PYTHON" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" wheel -q --no-deps -w "$tmp/dist" "$tmp/src"
wheel="$(ls "$tmp"/dist/gramstyle-*.whl)"
echo "check_floors: built $(basename "$wheel")"

# name==floor for every base requirement (each must have a floor) and the server extra's
# grpcio-* packages; fails on a compiled operator or a torch requirement in this wheel.
mapfile -t pins < <("$tmp/venv/bin/python" - "$wheel" <<'PY'
import re
import sys
import zipfile
from email.parser import HeaderParser

with zipfile.ZipFile(sys.argv[1]) as whl:
    names = whl.namelist()
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = HeaderParser().parsestr(whl.read(meta).decode()).get_all("Requires-Dist") or []
if any("/_C" in n for n in names):
    sys.exit("check_floors: the client-only wheel contains the compiled operator")
pins = []
for line in requires:
    req, _, marker = (part.strip() for part in line.partition(";"))
    m = re.fullmatch(r"([A-Za-z0-9._-]+)\s*(?:\[[^]]*\])?\s*(.*)", req)
    name, spec = m.group(1), m.group(2).strip("() ")
    if name.lower() == "torch" and not marker:
        sys.exit(f"check_floors: the client-only wheel requires {req}")
    if marker and not (re.fullmatch(r'extra\s*==\s*"server"', marker)
                       and name.lower().startswith("grpcio")):
        continue
    floors = [s.strip()[2:].strip() for s in spec.split(",") if s.strip().startswith(">=")]
    if not floors:
        sys.exit(f"check_floors: {line!r} declares no >= floor")
    pins.append(f"{name}=={floors[0]}")
print("\n".join(pins))
PY
)
echo "check_floors: installing with ${pins[*]}"
"${pip[@]}" install -q --no-deps "$wheel"
"${pip[@]}" install -q "${pins[@]}"
"${pip[@]}" check
"${pip[@]}" list --format=freeze | grep -iE '^(grpcio|protobuf|pillow|tqdm)' | sed 's/^/check_floors:   /'

# No torch; the stubs load (they check grpcio and protobuf against their generators); a call
# through the health service exercises grpcio itself.
"$tmp/venv/bin/python" - <<'PY'
import importlib.util
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import gramstyle.client  # noqa: F401
from gramstyle.v1 import gramstyle_pb2, gramstyle_pb2_grpc

assert importlib.util.find_spec("torch") is None, "torch is installed"
request = gramstyle_pb2.StylizeRequest(content_weight=1, size=64)
assert gramstyle_pb2.StylizeRequest.FromString(request.SerializeToString()) == request
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
names = (gramstyle_pb2.DESCRIPTOR.services_by_name["StyleTransferService"].full_name,
         reflection.SERVICE_NAME)
reflection.enable_server_reflection(names, server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
try:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        gramstyle_pb2_grpc.StyleTransferServiceStub(channel)
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, reply
finally:
    server.stop(None)
print(f"check_floors: stubs, client and a gRPC call work with grpcio {grpc.__version__}")
PY
echo "check_floors: done in $(( $(date +%s) - start )) s"
