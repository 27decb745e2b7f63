"""The HTTP/JSON front (server/http.py) against a real in-process server on loopback ports,
spoken to with httpx (and raw sockets where the point is what is *not* sent).

Covers: a Stylize stream as server-sent events (progress, then a result whose image decodes
to the requested size and to the same pixels as gRPC's answer to the same request), the
multipart form, ComputeLosses and GetServerInfo equal to gRPC's, errors as Google's JSON
error object with the gRPC message, field violations and the mapped HTTP status (a bad
option, a malformed body, an unknown model), bearer tokens, bodies over the limit refused
before they are read (Content-Length, and a chunked body as it streams), /readyz and new
calls while draining, a disconnect stopping the optimisation and freeing the worker, a full
queue (429), request ids and metrics by route, idle keep-alive connections against
/healthz and gRPC health, and HTTPS with the server's certificate.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from conftest import build_server, small_png
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from gramstyle.engine.stop import Cancelled
from gramstyle.server.http import HTTP_STATUS, body_limit
from gramstyle.server.serve import GramstyleServer
from gramstyle.v1 import gramstyle_pb2 as pb

STYLIZE = "POST /v1/stylize"
#: A run that goes on until it is stopped.
LONG = {"iterations": 10_000, "tolerance": 0.0}


#: The conftest ``server``: one worker and one queue slot (the admission test is exact), and
#: HTTP on a free port.
SERVER_SETTINGS = {"http_port": 0}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def data(images) -> dict[str, bytes]:
    return {"cat": small_png(images["cat"]), "starry": small_png(images["starry"])}


def stylize_json(data: dict[str, bytes], **fields) -> dict:
    body = {"content": [{"data": b64(data["cat"])}], "style": [{"data": b64(data["starry"])}],
            "size": 64, "iterations": 2}
    body.update(fields)
    return body


def parse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    """Server-sent events as (event name, JSON data)."""
    kind, data = "message", ""
    for line in lines:
        if line == "":
            if data:
                yield kind, json.loads(data)
            kind, data = "message", ""
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()


def stylize_events(http: httpx.Client, **kwargs) -> list[tuple[str, dict]]:
    with http.stream("POST", "/v1/stylize", **kwargs) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(parse_events(response.iter_lines()))


def requests_total(server: GramstyleServer, rpc: str, code: str) -> float:
    return server.metrics.registry.get_sample_value(
        "gramstyle_requests_total", {"rpc": rpc, "code": code}) or 0.0


def decode(image: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(image["data"])))


# ------------------------------------------------------------------------------ Stylize


def test_stylize_streams_progress_and_the_same_image_as_grpc(http, stub, data, server,
                                                             wait_for):
    before = requests_total(server, STYLIZE, "OK")
    body = stylize_json(data, iterations=7, progressEvery=3, preview=True, seed=3)
    events = stylize_events(http, json=body)
    kinds = [kind for kind, _ in events]
    assert kinds == ["progress"] * 4 + ["result"]
    progress = [message["progress"] for _, message in events[:-1]]
    assert [p["iteration"] for p in progress] == [0, 3, 6, 7]
    assert progress[-1]["losses"]["total"] < progress[0]["losses"]["total"]
    assert all(decode(p["preview"]).size == (64, 43) for p in progress)  # cat: 451x300
    result = events[-1][1]["result"]
    image = decode(result["image"])
    assert image.format == "PNG" and image.size == (64, 43)
    assert (result["image"]["width"], result["image"]["height"]) == (64, 43)
    assert result["stats"]["iterations"] == 7 and result["stats"]["weights"] == "random"

    # One contract: the same JSON, parsed as the proto, run over gRPC, gives the same image.
    request = json_format.ParseDict(body, pb.StylizeRequest())
    final = [m.result for m in stub.Stylize(request, timeout=60) if m.HasField("result")]
    grpc_pixels = np.asarray(Image.open(io.BytesIO(final[0].image.data)))
    np.testing.assert_array_equal(np.asarray(image), grpc_pixels)
    wait_for(lambda: requests_total(server, STYLIZE, "OK") == before + 1,
             what="the POST /v1/stylize OK count")


def test_stylize_multipart_form(http, data):
    events = stylize_events(http, files=[("content", ("cat.png", data["cat"], "image/png")),
                                         ("style", ("a.png", data["starry"], "image/png")),
                                         ("style", ("b.png", data["cat"], "image/png"))],
                            data={"size": "48", "iterations": "2", "preview": "on",
                                  "style_weight": "10", "preserveColors": "false"})
    assert events[-1][0] == "result"
    assert decode(events[-1][1]["result"]["image"]).size == (48, 32)
    assert all(kind == "progress" and "preview" in m["progress"] for kind, m in events[:-1])


@pytest.mark.parametrize("fields, status, code, field, message", [
    ({"size": 8}, 400, "INVALID_ARGUMENT", "size", "size: must be an integer between 16"),
    ({"iterations": 0}, 400, "INVALID_ARGUMENT", "iterations", "iterations: "),
    ({"weights": "nope"}, 400, "FAILED_PRECONDITION", "weights",
     "weights: model */nope is not loaded"),
])
def test_a_bad_option_is_the_grpc_error_as_json(http, stub, data, fields, status, code, field,
                                                message):
    response = http.post("/v1/stylize", json=stylize_json(data, **fields))
    assert response.status_code == status == HTTP_STATUS[getattr(grpc.StatusCode, code)]
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == status and error["status"] == code
    assert error["message"].startswith(message), error["message"]
    (violation,) = error["details"][0]["fieldViolations"]
    assert violation["field"] == field
    # The very message gRPC gives.
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Stylize(json_format.ParseDict(stylize_json(data, **fields),
                                                pb.StylizeRequest()), timeout=30))
    assert info.value.details() == error["message"]


@pytest.mark.parametrize("body, problem", [
    (b"{nope", "request body: not valid JSON"),
    (b"[1, 2]", "request body: expected a JSON object (gramstyle.v1.StylizeRequest), got list"),
    (b'{"sise": 64}', 'has no field named "sise"'),
    (b'{"size": "big"}', "size: Failed to parse size field"),
    (b'{"content": [{"data": "a"}]}', "content: Failed to parse content field"),
    (b"[" * 100_000 + b"]" * 100_000, "request body: "),
    (b'{"size": 64, "arch": "\xff"}', "request body: not UTF-8"),
    (b'{"\\ud800": 1}', "request body: a field name is not valid Unicode"),
    (b'{"arch": "\\ud800"}', "arch: Failed to parse arch field: Unpaired surrogate"),
    (b'{"content": [5]}', "content: Failed to parse content field"),
    (b'{"size": 2147483648}', "size: Failed to parse size field"),
])
def test_a_malformed_body_is_400_naming_the_problem(http, body, problem):
    response = http.post("/v1/stylize", content=body,
                         headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    assert problem in error["message"], error["message"]
    field = problem.split(":")[0]
    if field in ("size", "content"):  # a problem with a field carries its violation
        assert error["details"][0]["fieldViolations"][0]["field"] == field


_FIELDS = sorted({f.json_name for f in pb.StylizeRequest.DESCRIPTOR.fields}
                 | {f.name for f in pb.ComputeLossesRequest.DESCRIPTOR.fields})
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=60, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=6), _JSON,
                            max_size=4) | _JSON,
       path=st.sampled_from(["/v1/stylize", "/v1/losses"]))
def test_no_json_body_is_a_500(http, body, path):
    """Generated JSON (field names of both requests, any values): always an answer naming
    a problem, never INTERNAL."""
    response = http.post(path, content=json.dumps(body).encode(),
                         headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert response.json()["error"]["message"]


def test_a_corrupt_image_is_400_naming_the_image(http, data):
    response = http.post("/v1/stylize", files=[
        ("content", ("cat.png", data["cat"], "image/png")),
        ("style", ("bad.png", b"\x89PNG\r\n\x1a\n not really", "image/png"))],
        data={"size": "32", "iterations": "1"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["message"].startswith("style[0]: "), error["message"]
    assert error["details"][0]["fieldViolations"][0]["field"] == "style[0]"


# ------------------------------------------------------------------------------ other RPCs


def test_losses_and_info_equal_grpc(http, stub, data):
    body = {"candidate": b64(data["cat"]), "content": [{"data": b64(data["cat"])}],
            "style": [{"data": b64(data["starry"])}], "styleWeight": 2.0}
    response = http.post("/v1/losses", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    expected = stub.ComputeLosses(json_format.ParseDict(body, pb.ComputeLossesRequest()),
                                  timeout=60)
    assert (answer["width"], answer["height"]) == (64, 43)
    assert answer["losses"]["total"] == pytest.approx(expected.losses.total, rel=1e-6)
    assert answer["losses"]["content"] == 0  # the candidate is the content image

    info = http.get("/v1/info")
    assert info.status_code == 200
    parsed = json_format.ParseDict(info.json(), pb.GetServerInfoResponse())
    grpc_info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert parsed.limits == grpc_info.limits and parsed.models == grpc_info.models
    assert info.json()["limits"]["maxImages"] == 8  # canonical JSON: lowerCamelCase


def test_unknown_route_and_method_are_json_errors(http):
    missing = http.get("/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["status"] == "NOT_FOUND"
    wrong = http.get("/v1/stylize")
    assert wrong.status_code == 405 and "POST" in wrong.headers["allow"]


def test_request_id_is_echoed_and_metrics_are_by_route(http, server, wait_for):
    before = requests_total(server, "GET /v1/info", "OK")
    response = http.get("/v1/info", headers={"x-request-id": "http-test-42"})
    assert response.headers["x-request-id"] == "http-test-42"
    fresh = http.get("/v1/info", headers={"x-request-id": "bad id with spaces"})
    assert len(fresh.headers["x-request-id"]) == 16
    wait_for(lambda: requests_total(server, "GET /v1/info", "OK") == before + 2,
             what="the GET /v1/info OK count")
    assert http.get("/healthz").json() == {"status": "SERVING"}
    assert http.get("/readyz").json() == {"status": "SERVING"}
    wait_for(lambda: requests_total(server, "GET /readyz", "OK") >= 1, what="/readyz counted")


# ------------------------------------------------------------------------------ limits


def raw_request(port: int, head: bytes, body_chunks: Iterable[bytes] = (),
                timeout: float = 30) -> tuple[bytes, int]:
    """Send ``head`` then body chunks until the server answers; returns (the answer, body
    bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        answer = b""
        deadline = time.monotonic() + timeout
        for chunk in body_chunks:
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
            if answer:
                break
            try:
                sock.sendall(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        sock.setblocking(True)
        sock.settimeout(max(1.0, deadline - time.monotonic()))

        def complete() -> bool:  # the head, and as much body as it announces
            head, _, body = answer.partition(b"\r\n\r\n")
            lengths = [line.split(b":")[1] for line in head.lower().split(b"\r\n")
                       if line.startswith(b"content-length:")]
            return bool(_) and len(body) >= int(lengths[0] if lengths else 0)

        while not complete():
            more = sock.recv(65536)
            if not more:
                break
            answer += more
        return answer, sent


def test_an_oversized_body_is_refused_before_it_is_read(server):
    limit = body_limit(64 * 2**20)
    head = (f"POST /v1/stylize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {limit + 1}\r\n\r\n").encode()
    start = time.monotonic()
    answer, _ = raw_request(server.http_port, head)  # not a byte of the body is sent
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert time.monotonic() - start < 10, "answered without waiting for the body"
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == 413 and error["status"] == "RESOURCE_EXHAUSTED"
    assert error["message"].startswith(f"request body: {limit + 1} bytes, over this server's "
                                       f"limit of {limit} bytes")


def test_a_chunked_body_is_cut_off_at_the_limit(random_engine):
    with build_server([random_engine], http_port=0, max_message_mb=1) as srv:
        limit = body_limit(2**20)
        head = (b"POST /v1/losses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"8000\r\n" + b" " * 0x8000 + b"\r\n"  # 32 KiB of JSON whitespace a chunk
        answer, sent = raw_request(srv.http_port, head, [chunk] * 320)  # 10 MiB, 7x the limit
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["message"] == (f"request body: over this server's limit "
                                    f"of {limit} bytes (the message limit of 1048576 bytes in "
                                    f"base64, plus the JSON)")
        assert sent < 10 * 2**20 / 2, f"the server read {sent} bytes of a {limit} byte limit"
        metrics = srv.metrics.registry
        assert metrics.get_sample_value("gramstyle_requests_total", {
            "rpc": "POST /v1/losses", "code": "RESOURCE_EXHAUSTED"}) == 1


def test_a_full_queue_is_429_while_health_answers(http, data, server, wait_for):
    long = stylize_json(data, **LONG, progressEvery=1000)
    base = f"http://127.0.0.1:{server.http_port}"
    opened: list[httpx.Response] = []

    def send_quietly(client: httpx.Client, request: httpx.Request) -> None:
        with contextlib.suppress(httpx.HTTPError):  # cut off when the test closes it
            opened.append(client.send(request, stream=True))

    clients = [httpx.Client(base_url=base, timeout=60) for _ in range(2)]
    try:
        for client in clients:  # one runs, one waits
            request = client.build_request("POST", "/v1/stylize", json=long)
            if not opened:
                opened.append(client.send(request, stream=True))  # headers: it runs
            else:
                threading.Thread(target=send_quietly, args=(client, request),
                                 daemon=True).start()
        wait_for(lambda: server.work.queued >= 1, what="the second call to be queued")
        refused = http.post("/v1/stylize", json=long)
        assert refused.status_code == 429
        assert refused.json()["error"]["message"].startswith("server busy: 1 of 1 worker(s)")
        assert http.get("/healthz").status_code == 200
    finally:
        for client in clients:
            client.close()  # the connections close: both calls are cancelled
    assert server.work.wait_idle(30), "the worker was not freed"


# ------------------------------------------------------------------------------ disconnect


def test_a_disconnect_stops_the_optimisation_within_a_second(data, server, random_engine,
                                                              spy, wait_for):
    engine = spy(random_engine)
    before = requests_total(server, STYLIZE, "CANCELLED")
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=60) as client:
        with client.stream("POST", "/v1/stylize",
                           json=stylize_json(data, **LONG, progressEvery=1)) as response:
            events = parse_events(response.iter_lines())
            assert [next(events)[0], next(events)[0]] == ["progress", "progress"]
    gone = time.monotonic()  # the connection is closed
    engine.caller_gone.set()
    run = engine.last("stylize")
    stopped = time.monotonic() - gone
    assert isinstance(run.error, Cancelled)
    assert run.steps_after_caller_gone <= 2, run.steps_after_caller_gone
    assert stopped < 1.0 + 1.0, f"stopped {stopped:.2f} s after the disconnect"  # + load
    assert server.work.wait_idle(10)
    wait_for(lambda: requests_total(server, STYLIZE, "CANCELLED") == before + 1,
             what="the CANCELLED count")


# ------------------------------------------------------------------------------ keep-alive


def test_idle_keepalive_connections_do_not_slow_health(server, http):
    idle = [socket.create_connection(("127.0.0.1", server.http_port)) for _ in range(200)]
    try:
        for sock in idle[:100]:  # half of them half-way through a request
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.2)
        http.get("/healthz")  # a warm connection, as a probe has
        worst = 0.0
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            check(health_pb2.HealthCheckRequest(), timeout=10)
            for _ in range(5):
                start = time.monotonic()
                assert http.get("/healthz").status_code == 200
                middle = time.monotonic()
                check(health_pb2.HealthCheckRequest(), timeout=10)
                worst = max(worst, middle - start, time.monotonic() - middle)
        assert worst < 0.1, f"a health check took {worst * 1000:.0f} ms"
    finally:
        for sock in idle:
            sock.close()


# ------------------------------------------------------------------------------ tokens, TLS


def test_bearer_tokens(random_engine, data, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# one per line\ns3cret-token\n")
    from gramstyle.server.security import TokenStore

    with build_server([random_engine], http_port=0, tokens=TokenStore(tokens)) as srv, httpx.Client(
            base_url=f"http://127.0.0.1:{srv.http_port}", timeout=60) as client:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret-token"}):
            refused = client.post("/v1/stylize", json=stylize_json(data), headers=headers)
            assert refused.status_code == 401
            assert refused.json()["error"] == {"code": 401, "status": "UNAUTHENTICATED",
                                               "message": "missing or invalid bearer token"}
        assert client.get("/v1/info").status_code == 401
        assert client.get("/healthz").status_code == 200  # probes need no token
        assert client.get("/").status_code == 200  # the page asks for one itself
        ok = client.get("/v1/info", headers={"authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200 and ok.json()["models"][0]["weights"] == "random"
        # Refused before the body is read, however large it says it is.
        answer, _ = raw_request(srv.http_port, b"POST /v1/stylize HTTP/1.1\r\nHost: x\r\n"
                                               b"Content-Length: 999999999999\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 401 ")


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``localhost`` (its own CA) and its key, as PEM files
    ``NAME.pem`` and ``NAME.key``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 -- runs on 3.10
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def served_certificate(port: int) -> bytes:
    """The DER certificate a new TLS connection to the port is shown."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        return tls.getpeercert(binary_form=True)


def der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def test_https_with_the_server_certificate_and_its_reload(random_engine, tmp_path):
    from gramstyle.server.security import TlsFiles

    cert, key = self_signed(tmp_path, "server")
    with build_server([random_engine], http_port=0, tls=TlsFiles(cert, key)) as srv:
        trust = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(verify=trust, timeout=30) as client:
            response = client.get(f"https://localhost:{srv.http_port}/readyz")
            assert response.json() == {"status": "SERVING"}
        with pytest.raises(httpx.HTTPError):  # plaintext is not served
            httpx.get(f"http://127.0.0.1:{srv.http_port}/readyz", timeout=10)
        # A new certificate in the same files: after a reload (SIGHUP), new connections
        # get it, on the HTTP port as on the gRPC one.
        old = der(cert)
        assert served_certificate(srv.http_port) == old
        new_cert, new_key = self_signed(tmp_path, "rotated")
        cert.write_bytes(new_cert.read_bytes())
        key.write_bytes(new_key.read_bytes())
        srv.reload()
        assert served_certificate(srv.http_port) == der(new_cert) != old
        assert served_certificate(srv.port) == der(new_cert)


def test_mutual_tls_over_https(random_engine, tmp_path):
    from gramstyle.server.security import TlsFiles

    cert, key = self_signed(tmp_path, "server")
    client_cert, client_key = self_signed(tmp_path, "client")  # its own CA
    with build_server([random_engine], http_port=0, tls=TlsFiles(cert, key, client_cert)) as srv:
        url = f"https://localhost:{srv.http_port}/healthz"
        trust = ssl.create_default_context(cafile=str(cert))
        with pytest.raises(httpx.HTTPError):  # no client certificate: no handshake
            httpx.get(url, verify=trust, timeout=10)
        trust.load_cert_chain(client_cert, client_key)
        assert httpx.get(url, verify=trust, timeout=10).json() == {"status": "SERVING"}


# ------------------------------------------------------------------------------ draining


def test_readyz_is_503_while_draining(random_engine, data, wait_for):
    srv = build_server([random_engine], http_port=0).start()
    base = f"http://127.0.0.1:{srv.http_port}"
    stopper = None
    try:
        with httpx.Client(base_url=base, timeout=60) as running, \
                running.stream("POST", "/v1/stylize",
                               json=stylize_json(data, **LONG, progressEvery=1)) as stream:
            events = parse_events(stream.iter_lines())
            assert next(events)[0] == "progress"
            stopper = threading.Thread(target=srv.stop, args=(30,), daemon=True)
            stopper.start()
            with httpx.Client(base_url=base, timeout=10) as probe:
                ready = wait_for(lambda: (r := probe.get("/readyz")).status_code == 503 and r,
                                 what="/readyz to turn 503")
                assert ready.json() == {"status": "NOT_SERVING"}
                assert probe.get("/healthz").status_code == 503
                refused = probe.post("/v1/stylize", json=stylize_json(data))
                assert refused.status_code == 503
                assert refused.json()["error"]["status"] == "UNAVAILABLE"
            # The call in flight goes on during the drain.
            assert next(events)[0] == "progress"
        # Leaving it (a disconnect) ends the drain at once.
        stopper.join(30)
        assert not stopper.is_alive(), "the server did not stop after its last call ended"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/healthz", timeout=5)
    finally:
        if stopper is None:
            srv.stop(None)


# ------------------------------------------------------------------------------ wiring


def test_a_busy_http_port_is_named(random_engine):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"^--http-port: port {port} is already in use$"):
            build_server([random_engine], http_port=port)


@pytest.mark.slow
def test_gramstyle_serve_takes_the_http_port_from_the_environment(tmp_path):
    """``GRAMSTYLE_HTTP_PORT`` (as ``--http-port``) through the real command: the ready line
    names the port, it answers, and SIGTERM stops both ports."""
    env = {**os.environ, "GRAMSTYLE_HTTP_PORT": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gramstyle.cli", "serve", "--weights", "random", "--host",
         "127.0.0.1", "--port", "0", "--grace", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        ready = ""
        for line in process.stdout:  # log lines may come first
            if "server ready" in line:
                ready = line
                break
        match = re.search(r", HTTP on :(\d+)", ready)
        assert match, ready
        response = httpx.get(f"http://127.0.0.1:{match.group(1)}/readyz", timeout=30)
        assert response.json() == {"status": "SERVING"}
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_http_port_from_the_flag_or_the_environment(monkeypatch, capsys):
    from gramstyle.cli import main
    from gramstyle.server import serve

    seen = []
    monkeypatch.setattr(serve, "run", lambda config, signals=None: seen.append(config) or 0)
    monkeypatch.setattr(serve, "configure_logging", lambda *args: None)
    assert main(["serve"]) == 0 and seen[-1].http_port is None  # off by default
    monkeypatch.setenv("GRAMSTYLE_HTTP_PORT", "8080")
    assert main(["serve"]) == 0 and seen[-1].http_port == 8080
    assert main(["serve", "--http-port", "9090"]) == 0 and seen[-1].http_port == 9090
    assert main(["serve", "--http-port", "70000"]) == 2
    assert "--http-port: must be <= 65535, got 70000" in capsys.readouterr().err
