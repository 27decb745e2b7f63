"""The server side of TLS, mutual TLS, bearer tokens, the plaintext health port, reloading on
SIGHUP and GRAMSTYLE_* environment configuration (``gramstyle serve``). Certificates come
from the ``pki`` fixture (conftest.py); in-process servers share the session's random VGG19."""

from __future__ import annotations

import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from conftest import PKI, build_server, small_png
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gramstyle.cli import main
from gramstyle.client import Client, ServiceError
from gramstyle.server import security
from gramstyle.server.security import TlsFiles, TokenStore
from gramstyle.server.serve import GramstyleServer
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
SERVICE = "gramstyle.v1.StyleTransferService"
TOKEN = "9f2c41d7e0b85a63c1d9e4f7a2b60c38"
OTHER_TOKEN = "71e5a0c9d3f84b26e8a1c07d5b9f3e42"
MESSAGE = "missing or invalid bearer token"


# ------------------------------------------------------------------------------ certificates


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` as a Kubernetes Secret volume or cert-manager does: a new file
    renamed over the old one."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(data)
    os.replace(fresh, path)


@pytest.fixture
def tokens_file(tmp_path) -> Path:
    path = tmp_path / "tokens.txt"
    path.write_text(f"# backend-a\n\n{TOKEN}\n  # indented comment\n")
    return path


# ------------------------------------------------------------------------------ helpers


def channel(port: int, pki: PKI, ca: str = "ca", client: str | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.pem[ca],
        private_key=pki.pem[f"{client}_key"] if client else None,
        certificate_chain=pki.pem[client] if client else None)
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def server_info(ch: grpc.Channel, metadata=None) -> pb.ServerInfo:
    return pb_grpc.StyleTransferServiceStub(ch).GetServerInfo(
        pb.GetServerInfoRequest(), timeout=20, metadata=metadata)


def health_status(ch: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(ch).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=20).status


def list_services(ch: grpc.Channel, metadata=None) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    answers = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=20,
        metadata=metadata)
    return [s.name for a in answers for s in a.list_services_response.service]


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    return caught.value


def long_stylize(images) -> pb.StylizeRequest:
    """A run that goes on until it is cancelled, reporting every iteration."""
    return pb.StylizeRequest(content=[pb.WeightedImage(data=small_png(images["cat"], 48))],
                             style=[pb.WeightedImage(data=small_png(images["starry"], 48))],
                             size=48, iterations=10_000, progress_every=1)


@pytest.fixture
def make_server(random_engine):
    """``make_server(**kwargs)``: a started in-process server on 127.0.0.1 (stopped after)."""
    started: list[GramstyleServer] = []

    def make(**kwargs) -> GramstyleServer:
        server = build_server([random_engine], **kwargs).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop(grace=None)


# ------------------------------------------------------------------------------ TLS, mTLS


def test_tls_serves_tls_only(pki, make_server):
    server = make_server(tls=TlsFiles(pki.path("server"), pki.path("server_key")))
    with channel(server.port, pki) as ch:
        assert server_info(ch).version
    # Plaintext, or a CA that did not sign the server's certificate: the handshake fails.
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as plain:
        assert rpc_error(server_info, plain).code() == grpc.StatusCode.UNAVAILABLE
    with channel(server.port, pki, ca="ca2") as wrong_ca:
        assert rpc_error(server_info, wrong_ca).code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki, make_server):
    server = make_server(tls=TlsFiles(pki.path("server"), pki.path("server_key"),
                                      pki.path("client_ca")))
    with channel(server.port, pki, client="client") as ch:
        assert server_info(ch).version
    with channel(server.port, pki) as no_cert:
        assert rpc_error(server_info, no_cert).code() == grpc.StatusCode.UNAVAILABLE
    with channel(server.port, pki, client="rogue") as rogue:
        assert rpc_error(server_info, rogue).code() == grpc.StatusCode.UNAVAILABLE


# ------------------------------------------------------------------------------ tokens


def test_tokens_health_open_everything_else_needs_one(pki, make_server, tokens_file, caplog):
    caplog.set_level(logging.DEBUG)
    server = make_server(tls=TlsFiles(pki.path("server"), pki.path("server_key")),
                         tokens=TokenStore(tokens_file))
    with channel(server.port, pki) as ch:
        stub = pb_grpc.StyleTransferServiceStub(ch)
        assert server_info(ch, bearer(TOKEN)).version
        assert server_info(ch, (("authorization", f"bearer {TOKEN}"),)).version
        for metadata in (None, bearer(OTHER_TOKEN), bearer(TOKEN[:-1]), bearer(TOKEN + "x"),
                         (("authorization", TOKEN),), (("authorization", f"Basic {TOKEN}"),)):
            error = rpc_error(server_info, ch, metadata)
            assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, MESSAGE)
        # Streams too, before the request is looked at; and reflection.
        error = rpc_error(stub.Stylize, pb.StylizeRequest(), timeout=20)
        assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, MESSAGE)
        assert rpc_error(list_services, ch).code() == grpc.StatusCode.UNAUTHENTICATED
        assert SERVICE in list_services(ch, bearer(TOKEN))
        # Health answers without a token, so that probes work.
        assert health_status(ch) == health_pb2.HealthCheckResponse.SERVING
        assert health_status(ch, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    # The phase-1 client sends the token its way.
    with Client(f"127.0.0.1:{server.port}", tls_ca=pki.path("ca"), token=TOKEN,
                timeout=20) as client:
        assert client.server_info().version
    with Client(f"127.0.0.1:{server.port}", tls_ca=pki.path("ca"), token=OTHER_TOKEN,
                timeout=20, retries=0) as client, pytest.raises(ServiceError) as caught:
        client.server_info()
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    # Refused calls are logged and counted; no token appears in the log, not even in part.
    assert "code=UNAUTHENTICATED" in caplog.text
    for token in (TOKEN, OTHER_TOKEN):
        assert not any(token[i:i + 8] in caplog.text for i in range(len(token) - 7))


def test_public_reflection_opens_reflection_and_info_only(pki, make_server, tokens_file):
    server = make_server(tls=TlsFiles(pki.path("server"), pki.path("server_key")),
                         tokens=TokenStore(tokens_file), public_reflection=True)
    with channel(server.port, pki) as ch:
        assert SERVICE in list_services(ch)
        assert server_info(ch).version
        error = rpc_error(pb_grpc.StyleTransferServiceStub(ch).Stylize, pb.StylizeRequest(),
                          timeout=20)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_token_file_changes_are_picked_up(pki, make_server, tokens_file, monkeypatch):
    monkeypatch.setattr(security, "CHANGE_CHECK_INTERVAL_S", 0.0)
    tokens = TokenStore(tokens_file)
    server = make_server(tokens=tokens)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        assert server_info(ch, bearer(TOKEN)).version
        write_atomically(tokens_file, f"{OTHER_TOKEN}\n".encode())  # as a Secret update
        assert server_info(ch, bearer(OTHER_TOKEN)).version
        assert rpc_error(server_info, ch, bearer(TOKEN)).code() == \
            grpc.StatusCode.UNAUTHENTICATED
        # A broken file at a reload keeps the previous tokens.
        write_atomically(tokens_file, b"has a space\n")
        assert server_info(ch, bearer(OTHER_TOKEN)).version
        assert not tokens.reload()
        # An emptied file is a list of no tokens: it revokes them all (issue 18).
        write_atomically(tokens_file, b"# nothing left\n")
        assert rpc_error(server_info, ch, bearer(OTHER_TOKEN)).code() == \
            grpc.StatusCode.UNAUTHENTICATED


def test_certificate_files_changed_on_disk_are_served(pki, make_server, tmp_path,
                                                      monkeypatch):
    """A Secret volume update (files swapped in place) reaches new connections without a
    signal; a half-written pair (key of another certificate) keeps the previous one."""
    monkeypatch.setattr(security, "CHANGE_CHECK_INTERVAL_S", 0.0)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(pki.pem["server"])
    key.write_bytes(pki.pem["server_key"])
    server = make_server(tls=TlsFiles(cert, key))
    with channel(server.port, pki) as ch:
        assert server_info(ch).version
    write_atomically(cert, pki.pem["server2"])  # the key does not match it yet
    with channel(server.port, pki) as ch:
        assert server_info(ch).version
    write_atomically(key, pki.pem["server2_key"])
    with channel(server.port, pki, ca="ca2") as ch:
        assert server_info(ch).version


@pytest.mark.parametrize("content, problem", [
    (b"# only comments\n\n", "holds no token"),
    (b"good-token\nhas a space\n", "line 2: a token must be printable ASCII"),
])
def test_bad_token_files(tmp_path, content, problem):
    path = tmp_path / "tokens"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=problem) as caught:
        TokenStore(path)
    assert str(caught.value).startswith(f"auth_tokens: {str(path)!r}")
    assert "has a space" not in str(caught.value)


# ------------------------------------------------------------------------------ health port


def test_health_port_is_plaintext_health_only_and_follows_the_drain(
        pki, make_server, images, tokens_file, wait_for):
    server = make_server(tls=TlsFiles(pki.path("server"), pki.path("server_key")),
                         tokens=TokenStore(tokens_file), health_port=0)
    assert server.health_port not in (None, 0, server.port)
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as plain, \
            channel(server.port, pki) as secure:
        assert health_status(plain) == health_pb2.HealthCheckResponse.SERVING
        assert health_status(plain, SERVICE) == health_pb2.HealthCheckResponse.SERVING
        # Nothing but health there.
        assert rpc_error(server_info, plain, bearer(TOKEN)).code() == \
            grpc.StatusCode.UNIMPLEMENTED
        # A call in flight keeps the drain going while the probe port is asked.
        call = pb_grpc.StyleTransferServiceStub(secure).Stylize(
            long_stylize(images), timeout=120, metadata=bearer(TOKEN))
        assert next(call).HasField("progress")
        stopper = threading.Thread(target=server.stop, kwargs={"grace": 60})
        stopper.start()
        try:
            wait_for(lambda: health_status(plain, SERVICE)
                     == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=30,
                     what="the health port to say NOT_SERVING during the drain")
            assert health_status(plain) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert next(call).HasField("progress")  # still running
        finally:
            call.cancel()
            stopper.join(timeout=60)
    assert not stopper.is_alive()


def test_connection_age_does_not_cut_a_call(pki, make_server, images, wait_for):
    """With connections aged out after 0.2 s, a call outliving that still runs (the grace
    lets it finish) and new calls keep working (the client reconnects)."""
    server = make_server(max_connection_age_s=0.2)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        call = pb_grpc.StyleTransferServiceStub(ch).Stylize(long_stylize(images), timeout=120)
        first = next(call).progress.iteration
        seen = wait_for(lambda: next(call).progress.iteration >= first + 5, timeout=90,
                        what="the call to go on past the connection's age")
        assert seen
        call.cancel()
        for _ in range(3):
            assert server_info(ch).version


# ------------------------------------------------------------------------------ gramstyle serve


@pytest.fixture
def no_model(monkeypatch):
    """Make ``gramstyle serve`` fail loudly if it gets as far as loading a model."""
    from gramstyle.server import serve

    def refuse(config):
        raise AssertionError("the checks should have stopped serve before the model loads")

    monkeypatch.setattr(serve, "load_engines", refuse)


def test_refuses_tokens_in_plaintext_to_the_network(tokens_file, no_model, capsys):
    assert main(["serve", "--host", "0.0.0.0", "--auth-tokens", str(tokens_file)]) == 2
    err = capsys.readouterr().err
    assert "--auth-tokens:" in err and "plaintext" in err and "--insecure-auth" in err


def test_insecure_auth_warns(caplog):
    with caplog.at_level(logging.WARNING):
        security.check_plaintext_tokens("[::]", tls=False, tokens=True, insecure_auth=True)
    assert "plaintext" in caplog.text
    with pytest.raises(ValueError, match="^auth_tokens: tokens would travel in plaintext"):
        security.check_plaintext_tokens("10.1.2.3", tls=False, tokens=True,
                                        insecure_auth=False)
    for host in ("127.0.0.1", "localhost", "[::1]"):
        security.check_plaintext_tokens(host, tls=False, tokens=True, insecure_auth=False)


@pytest.mark.parametrize("case", ["missing cert", "cert not PEM", "key of another cert",
                                  "missing key", "client CA not PEM", "token file missing"])
def test_bad_files_exit_2_naming_the_file(case, pki, tmp_path, no_model, capsys):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    missing = str(tmp_path / "nope.pem")
    files = {"--tls-cert": pki.path("server"), "--tls-key": pki.path("server_key")}
    flag, bad = {
        "missing cert": ("--tls-cert", missing),
        "cert not PEM": ("--tls-cert", str(garbage)),
        "key of another cert": ("--tls-key", pki.path("server2_key")),
        "missing key": ("--tls-key", missing),
        "client CA not PEM": ("--tls-client-ca", str(garbage)),
        "token file missing": ("--auth-tokens", missing),
    }[case]
    files[flag] = bad
    argv = ["serve", "--host", "127.0.0.1", *[x for kv in files.items() for x in kv]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{flag}: " in err and repr(bad) in err, err


@pytest.fixture
def captured_config(monkeypatch):
    """Run ``gramstyle serve`` up to the server and capture its ServeConfig."""
    from gramstyle.server import serve

    seen = []
    monkeypatch.setattr(serve, "run", lambda config, *signals: seen.append(config) or 0)
    monkeypatch.setattr(serve, "configure_logging", lambda *args: None)
    return seen


def test_environment_configures_serve_and_flags_beat_it(monkeypatch, captured_config, pki):
    monkeypatch.setenv("GRAMSTYLE_PORT", "6001")
    monkeypatch.setenv("GRAMSTYLE_WORKERS", "3")
    monkeypatch.setenv("GRAMSTYLE_TLS_CERT", pki.path("server"))
    monkeypatch.setenv("GRAMSTYLE_TLS_KEY", "/from/the/environment.key")
    monkeypatch.setenv("GRAMSTYLE_LOG_LEVEL", "debug")
    monkeypatch.setenv("GRAMSTYLE_PUBLIC_REFLECTION", "true")
    monkeypatch.setenv("GRAMSTYLE_MEMORY_BUDGET", "4608MiB")
    monkeypatch.setenv("GRAMSTYLE_ARCH", "vgg16")
    monkeypatch.setenv("GRAMSTYLE_METRICS_PORT", "")  # empty: unset
    assert main(["serve", "--port", "6002", "--tls-key", pki.path("server_key"),
                 "--log-level", "Warning"]) == 0
    config = captured_config[0]
    assert (config.port, config.workers) == (6002, 3)
    assert (config.tls_cert, config.tls_key) == (pki.path("server"), pki.path("server_key"))
    assert config.log_level == "WARNING" and config.public_reflection is True
    assert config.memory_budget == 4608 * 2**20 and config.arch == "vgg16"
    assert config.metrics_port is None and config.health_port is None


@pytest.mark.parametrize("variable, value, expected", [
    ("GRAMSTYLE_PORT", "fifty", "GRAMSTYLE_PORT:"),
    ("GRAMSTYLE_LOG_LEVEL", "loud", "GRAMSTYLE_LOG_LEVEL: must be one of"),
    ("GRAMSTYLE_INSECURE_AUTH", "maybe", "GRAMSTYLE_INSECURE_AUTH: expected"),
    ("GRAMSTYLE_MEMORY_BUDGET", "lots", "GRAMSTYLE_MEMORY_BUDGET:"),
])
def test_bad_environment_values_name_the_variable(monkeypatch, captured_config, capsys,
                                                  variable, value, expected):
    monkeypatch.setenv(variable, value)
    assert main(["serve"]) == 2
    assert expected in capsys.readouterr().err and not captured_config


def test_the_manifests_environment_parses(monkeypatch, captured_config):
    """Every GRAMSTYLE_* literal of the Kubernetes base and overlays is a valid setting."""
    for overlay in ("cpu", "gpu"):
        values = {}
        for kustomization in (REPO / "deploy/k8s/base/kustomization.yaml",
                              REPO / f"deploy/k8s/overlays/{overlay}/kustomization.yaml"):
            for name, value in re.findall(r"^\s*- (GRAMSTYLE_[A-Z_]+)=(.*)$",
                                          kustomization.read_text(), re.MULTILINE):
                values[name] = value.strip()
        assert {"GRAMSTYLE_TLS_CERT", "GRAMSTYLE_MEMORY_BUDGET", "GRAMSTYLE_HEALTH_PORT"} \
            <= values.keys()
        for name in [n for n in os.environ if n.startswith("GRAMSTYLE_")]:
            monkeypatch.delenv(name)
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        assert main(["serve"]) == 0, values
        config = captured_config.pop()
        assert config.health_port == int(values["GRAMSTYLE_HEALTH_PORT"])
        assert config.tls_cert == values["GRAMSTYLE_TLS_CERT"]
        assert config.log_level == "INFO"
        assert config.memory_budget > 2**30 and config.max_request_memory > 2**30


def test_help_names_the_variables(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for variable in ("GRAMSTYLE_PORT", "GRAMSTYLE_TLS_CERT", "GRAMSTYLE_AUTH_TOKENS",
                     "GRAMSTYLE_HEALTH_PORT", "GRAMSTYLE_QUEUE_SIZE", "GRAMSTYLE_ARCH"):
        assert f"[env {variable}]" in text


# ------------------------------------------------------------------------------ SIGHUP


@pytest.mark.slow
def test_sighup_rotates_certificate_and_tokens_without_dropping_calls(
        pki, tmp_path, images, wait_for):
    cert, key, tokens = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "tokens"
    cert.write_bytes(pki.pem["server"])
    key.write_bytes(pki.pem["server_key"])
    tokens.write_text(f"{TOKEN}\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "gramstyle.cli", "serve", "--arch", "vgg16", "--weights",
         "random", "--device", "cpu", "--host", "127.0.0.1", "--port", "0",
         "--health-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env=dict(os.environ, PYTHONUNBUFFERED="1", GRAMSTYLE_TLS_CERT=str(cert),
                 GRAMSTYLE_TLS_KEY=str(key), GRAMSTYLE_AUTH_TOKENS=str(tokens)))
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True).start()
    ready: queue.SimpleQueue[str] = queue.SimpleQueue()
    threading.Thread(target=lambda: ready.put(process.stdout.readline()), daemon=True).start()
    try:
        line = ready.get(timeout=180)
        assert "ready on port" in line and "TLS" in line and "health on :" in line, \
            (line, "".join(stderr))
        port = int(line.split("ready on port ")[1].split(":")[0])
        with channel(port, pki) as old:
            call = pb_grpc.StyleTransferServiceStub(old).Stylize(
                long_stylize(images), timeout=300, metadata=bearer(TOKEN))
            assert next(call).HasField("progress")
            # cert-manager renews (here: from another CA), a new token list; then SIGHUP.
            write_atomically(cert, pki.pem["server2"])
            write_atomically(key, pki.pem["server2_key"])
            write_atomically(tokens, f"{OTHER_TOKEN}\n".encode())
            process.send_signal(signal.SIGHUP)
            wait_for(lambda: "TLS certificate reloaded" in "".join(stderr)
                     and "token(s) loaded" in "".join(stderr), timeout=30,
                     what="the reload to be logged")
            # New connections get the new certificate and need the new token ...
            with channel(port, pki, ca="ca2") as new:
                assert server_info(new, bearer(OTHER_TOKEN)).version
                assert rpc_error(server_info, new, bearer(TOKEN)).code() == \
                    grpc.StatusCode.UNAUTHENTICATED
            with channel(port, pki, ca="ca") as stale:
                assert rpc_error(server_info, stale, bearer(OTHER_TOKEN)).code() == \
                    grpc.StatusCode.UNAVAILABLE
            # ... and the call in flight on the old connection goes on.
            for _ in range(3):
                assert next(call).HasField("progress")
            call.cancel()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, "".join(stderr)[-4000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
    log = "".join(stderr)
    assert "Traceback" not in log, log[-4000:]
    assert TOKEN[:8] not in log and OTHER_TOKEN[:8] not in log
