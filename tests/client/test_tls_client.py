"""The client side of TLS, mutual TLS and bearer tokens: Client/AsyncClient and the CLI's
--tls/--tls-ca/--tls-cert/--tls-key/--token flags (and GRAMSTYLE_TOKEN) against a small
test-local gRPC server with ssl_server_credentials and a token-checking interceptor.
Certificates come from the ``pki`` fixture (conftest.py)."""

from __future__ import annotations

import asyncio
import hmac
import os
import socket
import subprocess
import sys
import textwrap
import threading
import warnings
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image

from gramstyle import codec
from gramstyle.cli import main
from gramstyle.client import AsyncClient, Client, ServiceError
from gramstyle.results import Losses, StylizeResult
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

TOKEN = "s3cret-Token_1"


# ------------------------------------------------------------------------------ test server


class TokenCheck(grpc.ServerInterceptor):
    """Accepts calls whose ``authorization`` is ``Bearer <TOKEN>`` (constant-time
    comparison); others get UNAUTHENTICATED, except health, which stays open to probes.
    Records what each gramstyle call sent."""

    def __init__(self):
        self.seen: list[str | None] = []
        self._lock = threading.Lock()

    def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details)
        sent = dict(details.invocation_metadata).get("authorization")
        with self._lock:
            self.seen.append(sent)
        if hmac.compare_digest((sent or "").encode(), f"Bearer {TOKEN}".encode()):
            return continuation(details)

        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        return grpc.unary_unary_rpc_method_handler(refuse)


class Fake(pb_grpc.StyleTransferServiceServicer):
    """Answers every RPC with a small fixed answer."""

    def Stylize(self, request, context):
        yield pb.StylizeResponse(progress=pb.Progress(iteration=0, iterations=1))
        image = Image.new("RGB", (8, 6), (10, 200, 10))
        yield codec.result_message(StylizeResult(image=image, iterations=1,
                                                 losses=Losses(1.0, 0.5, 0.25, 0.0),
                                                 elapsed_s=0.01, backend="fake",
                                                 device="cpu"), "png")

    def ComputeLosses(self, request, context):
        return pb.ComputeLossesResponse(width=8, height=6, losses=pb.Losses(total=2.0),
                                        backend="fake", device="cpu")

    def GetServerInfo(self, request, context):
        return pb.GetServerInfoResponse(version="fake-tls", backend="fake", device="cpu")


class Server:
    def __init__(self, credentials: grpc.ServerCredentials | None):
        self.tokens = TokenCheck()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                  interceptors=[self.tokens])
        pb_grpc.add_StyleTransferServiceServicer_to_server(Fake(), self.server)
        self.health = health.HealthServicer()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = "127.0.0.1:0"
        self.port = (self.server.add_secure_port(address, credentials) if credentials
                     else self.server.add_insecure_port(address))
        self.server.start()


@pytest.fixture(scope="module")
def tls_server(pki):
    server = Server(grpc.ssl_server_credentials([(pki.pem["server_key"], pki.pem["server"])]))
    yield server
    server.server.stop(None)


@pytest.fixture(scope="module")
def mtls_server(pki):
    server = Server(grpc.ssl_server_credentials(
        [(pki.pem["server_key"], pki.pem["server"])], root_certificates=pki.pem["client_ca"],
        require_client_auth=True))
    yield server
    server.server.stop(None)


@pytest.fixture(scope="module")
def plain_server():
    server = Server(None)
    yield server
    server.server.stop(None)


# ------------------------------------------------------------------------------ library


def test_tls_with_a_ca_file_or_bytes(tls_server, pki):
    for host in ("localhost", "127.0.0.1"):
        for ca in (pki.path("ca"), Path(pki.path("ca")), pki.pem["ca"],
                   pki.pem["ca"].decode()):
            with Client(f"{host}:{tls_server.port}", tls_ca=ca, token=TOKEN,
                        timeout=10) as client:
                assert client.tls
                assert client.server_info().version == "fake-tls"
    with Client(f"localhost:{tls_server.port}", tls_ca=pki.path("ca"), token=TOKEN,
                timeout=10) as client:
        seen = []
        result = client.stylize(b"x", (), progress=seen.append)
        assert result.image.size == (8, 6) and [p.iteration for p in seen] == [0]
        assert client.compute_losses(b"x").losses.total == 2.0


def test_the_server_certificate_is_checked(tls_server, pki):
    # Signed by a CA the client does not trust: the handshake fails (UNAVAILABLE).
    with Client(f"localhost:{tls_server.port}", tls_ca=pki.path("client_ca"), token=TOKEN,
                timeout=10, retries=0) as client:
        with pytest.raises(ServiceError) as error:
            client.server_info()
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    # The name is checked too: the certificate is for localhost and gramstyle.internal ...
    with Client(f"127.0.0.1:{tls_server.port}", tls_ca=pki.path("ca"), token=TOKEN,
                tls_server_name="gramstyle.internal", timeout=10) as client:
        assert client.server_info().version == "fake-tls"
    # ... not for another name.
    with Client(f"127.0.0.1:{tls_server.port}", tls_ca=pki.path("ca"), token=TOKEN,
                tls_server_name="other.example", timeout=10, retries=0) as client:
        with pytest.raises(ServiceError) as error:
            client.server_info()
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    # A plaintext client cannot talk to a TLS server.
    with Client(f"127.0.0.1:{tls_server.port}", token=TOKEN, timeout=10,
                retries=0) as client:
        with pytest.raises(ServiceError) as error:
            client.server_info()
    assert error.value.code == grpc.StatusCode.UNAVAILABLE


TLS_TRUE_SCRIPT = textwrap.dedent("""
    import sys
    from gramstyle.client import Client, ServiceError
    with Client(sys.argv[1], tls=True, token=sys.argv[2], timeout=10, retries=0) as client:
        try:
            print("VERSION", client.server_info().version)
        except ServiceError as exc:
            print("ERROR", exc.code.name)
""")


@pytest.mark.parametrize("trusted", [True, False])
def test_tls_true_uses_the_system_roots(tls_server, pki, tmp_path, trusted):
    """tls=True trusts gRPC's default roots, which GRPC_DEFAULT_SSL_ROOTS_FILE_PATH
    replaces: with the test CA there the call succeeds, with the system's it fails."""
    script = tmp_path / "tls_true.py"
    script.write_text(TLS_TRUE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"}
    if trusted:
        env["GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"] = pki.path("ca")
    proc = subprocess.run([sys.executable, str(script), f"localhost:{tls_server.port}", TOKEN],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = "VERSION fake-tls" if trusted else "ERROR UNAVAILABLE"
    assert expected in proc.stdout.splitlines(), proc.stdout + proc.stderr[-2000:]


def test_mutual_tls(mtls_server, pki):
    target = f"localhost:{mtls_server.port}"
    with Client(target, tls_ca=pki.path("ca"), tls_cert=pki.path("client"),
                tls_key=pki.path("client_key"), token=TOKEN, timeout=10) as client:
        assert client.server_info().version == "fake-tls"
    with Client(target, tls_ca=pki.pem["ca"], tls_cert=pki.pem["client"],
                tls_key=pki.pem["client_key"], token=TOKEN, timeout=10) as client:
        assert client.server_info().version == "fake-tls"
    # No client certificate, or one the server's client CA did not sign: refused.
    for cert, key in ((None, None), ("rogue", "rogue_key")):
        with Client(target, tls_ca=pki.path("ca"), token=TOKEN, timeout=10, retries=0,
                    tls_cert=cert and pki.path(cert), tls_key=key and pki.path(key)) as client:
            with pytest.raises(ServiceError) as error:
                client.server_info()
        assert error.value.code == grpc.StatusCode.UNAVAILABLE, cert


def test_token_is_sent_as_a_bearer_header(tls_server, pki):
    target = f"localhost:{tls_server.port}"
    tls_server.tokens.seen.clear()
    for token in (None, "wrong-token"):
        with Client(target, tls_ca=pki.path("ca"), token=token, timeout=10) as client:
            for call in (client.server_info, lambda: client.stylize(b"x", ()),
                         lambda: client.compute_losses(b"x")):
                with pytest.raises(ServiceError) as error:
                    call()
                # A caller's mistake: not retried, and the CLI exits 2.
                assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
                assert error.value.message == "missing or invalid bearer token"
                assert error.value.caller_mistake and error.value.attempts == 1
    assert tls_server.tokens.seen == [None] * 3 + ["Bearer wrong-token"] * 3
    tls_server.tokens.seen.clear()
    with Client(target, tls_ca=pki.path("ca"), token=TOKEN, timeout=10,
                metadata=[("x-request-id", "r1")]) as client:
        client.server_info()
    assert tls_server.tokens.seen == [f"Bearer {TOKEN}"]


def test_async_client_tls_mtls_and_token(tls_server, mtls_server, pki):
    async def main():
        async with AsyncClient(f"localhost:{tls_server.port}", tls_ca=pki.pem["ca"],
                               token=TOKEN, timeout=10) as client:
            info = await client.server_info()
            result = await client.stylize(b"x", ())
        async with AsyncClient(f"localhost:{mtls_server.port}", tls_ca=pki.path("ca"),
                               tls_cert=pki.path("client"), tls_key=pki.path("client_key"),
                               token=TOKEN, timeout=10) as client:
            report = await client.compute_losses(b"x")
        async with AsyncClient(f"localhost:{tls_server.port}", tls_ca=pki.path("ca"),
                               timeout=10) as client:
            try:
                await client.server_info()
            except ServiceError as exc:
                error = exc
        return info, result, report, error

    info, result, report, error = asyncio.run(main())
    assert info.version == "fake-tls" and result.image.size == (8, 6)
    assert report.losses.total == 2.0 and error.code == grpc.StatusCode.UNAUTHENTICATED


def test_token_over_plaintext_warns_off_this_machine(plain_server):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on loopback
        for target in (f"127.0.0.1:{plain_server.port}", f"localhost:{plain_server.port}",
                       f"dns:///localhost:{plain_server.port}", "[::1]:5",
                       "127.0.0.1:5,127.0.0.2:6", "unix:/tmp/gramstyle.sock"):
            Client(target, token=TOKEN).close()
        Client("10.1.2.3:50051", token=TOKEN, tls=True).close()  # encrypted: fine
        Client("10.1.2.3:50051").close()  # no token: nothing to leak
    with Client(f"127.0.0.1:{plain_server.port}", token=TOKEN, timeout=10) as client:
        assert client.server_info().version == "fake-tls"
    for target in ("10.1.2.3:50051", "dns:///gramstyle-headless.ns.svc:50051",
                   "127.0.0.1:5,10.0.0.1:6"):
        with pytest.warns(UserWarning, match=r"^token: sent in plaintext to .*not this "
                                             r"machine") as record:
            Client(target, token=TOKEN).close()
        assert TOKEN not in str(record[0].message)


def test_bad_tls_arguments_name_the_argument(pki, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    missing = tmp_path / "missing.pem"
    cases = [
        ({"tls_ca": missing}, rf"^tls_ca: cannot read '{missing}': No such file or directory"),
        ({"tls_ca": junk}, rf"^tls_ca: '{junk}' is not a PEM certificate"),
        ({"tls_ca": tmp_path}, r"^tls_ca: cannot read .*: Is a directory"),
        ({"tls_ca": b""}, r"^tls_ca: the 0 bytes given is not a PEM certificate"),
        ({"tls_cert": pki.path("client"), "tls_key": pki.path("client")},
         r"^tls_key: '.*client.pem' is not a PEM private key"),
        ({"tls_cert": pki.path("client_key"), "tls_key": pki.path("client_key")},
         r"^tls_cert: '.*client_key.pem' is not a PEM certificate"),
        ({"tls_cert": pki.path("client")}, r"^tls_key: mutual TLS needs both tls_cert and "
                                           r"tls_key; tls_key is missing"),
        ({"tls_key": pki.path("client_key")}, r"^tls_cert: mutual TLS needs both"),
        ({"tls": True, "credentials": grpc.ssl_channel_credentials()},
         r"^credentials: give either credentials= or tls"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            Client("localhost:50051", **kwargs)
    with pytest.raises(TypeError, match=r"^tls_ca: expected a file path or PEM bytes, got int"):
        Client("localhost:50051", tls_ca=123)
    for token in ("", "two words", "line\nbreak", "t\u00f6ken"):
        with pytest.raises(ValueError, match=r"^token: must be a non-empty string") as error:
            Client("localhost:50051", token=token)
        assert token == "" or token not in str(error.value)


# ------------------------------------------------------------------------------ CLI


def test_cli_tls_and_token_from_the_environment(tls_server, pki, tmp_path, capsys,
                                                monkeypatch):
    server = ["--server", f"localhost:{tls_server.port}", "--tls-ca", pki.path("ca")]
    monkeypatch.setenv("GRAMSTYLE_TOKEN", TOKEN)
    assert main(["info", *server]) == 0
    out = capsys.readouterr().out
    assert "version   gramstyle fake-tls" in out

    image = tmp_path / "in.png"
    Image.new("RGB", (16, 12), (1, 2, 3)).save(image)
    out_path = tmp_path / "out.png"
    assert main(["stylize", *server, "--content", str(image), "-o", str(out_path), "-q"]) == 0
    assert Image.open(out_path).size == (8, 6)
    assert main(["losses", str(image), *server, "--content", str(image)]) == 0
    assert "total" in capsys.readouterr().out

    # --token beats the variable.
    assert main(["info", *server, "--token", "wrong-token"]) == 2
    assert ("gramstyle: error: server answered UNAUTHENTICATED: missing or invalid bearer "
            "token") in capsys.readouterr().err
    monkeypatch.delenv("GRAMSTYLE_TOKEN")
    assert main(["info", *server]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["info", *server, "--token", TOKEN]) == 0
    monkeypatch.setenv("GRAMSTYLE_TOKEN", "")  # empty: as if unset
    assert main(["info", *server]) == 2
    monkeypatch.setenv("GRAMSTYLE_TOKEN", "two words")
    assert main(["info", *server]) == 2
    err = capsys.readouterr().err
    assert "gramstyle: error: GRAMSTYLE_TOKEN: must be a non-empty string" in err
    assert "two words" not in err


def test_cli_mutual_tls(mtls_server, pki, capsys, monkeypatch):
    monkeypatch.setenv("GRAMSTYLE_TOKEN", TOKEN)
    server = ["--server", f"localhost:{mtls_server.port}", "--tls-ca", pki.path("ca")]
    assert main(["info", *server, "--tls-cert", pki.path("client"), "--tls-key",
                 pki.path("client_key")]) == 0
    assert "fake-tls" in capsys.readouterr().out
    assert main(["info", *server, "--retries", "0"]) == 1  # no client certificate
    assert "server answered UNAVAILABLE" in capsys.readouterr().err


def test_cli_tls_without_a_ca_trusts_the_system_roots(tls_server, capsys, monkeypatch):
    monkeypatch.setenv("GRAMSTYLE_TOKEN", TOKEN)
    assert main(["info", "--server", f"localhost:{tls_server.port}", "--tls",
                 "--retries", "0", "--timeout", "10"]) == 1
    assert "server answered UNAVAILABLE" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--tls-ca", "{missing}"], "--tls-ca: cannot read '{missing}': No such file or directory"),
    (["--tls-ca", "{junk}"], "--tls-ca: '{junk}' is not a PEM certificate"),
    (["--tls-cert", "{junk}"], "--tls-key: mutual TLS needs both tls_cert and tls_key"),
    (["--tls-cert", "{client}", "--tls-key", "{junk}"], "--tls-key: '{junk}' is not a PEM "
                                                        "private key"),
    (["--token", "a b"], "--token: must be a non-empty string"),
    (["--retries", "-1"], "--retries: must be an integer between 0 and 10, got -1"),
])
def test_cli_bad_tls_flags_exit_2_naming_the_flag(pki, tmp_path, capsys, args, message):
    paths = {"missing": str(tmp_path / "missing.pem"), "junk": str(tmp_path / "junk.pem"),
             "client": pki.path("client")}
    Path(paths["junk"]).write_text("junk")
    args = [a.format(**paths) for a in args]
    assert main(["info", "--server", "localhost:50051", *args]) == 2
    assert f"gramstyle: error: {message.format(**paths)}" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--tls"], ["--tls-ca", "ca.pem"], ["--token", "t"],
                                  ["--retries", "1"]])
def test_cli_remote_flags_need_a_server(flag, capsys):
    assert main(["info", *flag]) == 2
    assert f"gramstyle: error: {flag[0]}: applies to a call to --server" in \
        capsys.readouterr().err


def test_cli_warns_about_a_token_in_plaintext(capsys):
    code = main(["info", "--server", "192.0.2.1:50051", "--token", TOKEN, "--timeout", "0.5",
                 "--retries", "0"])
    err = capsys.readouterr().err
    assert code == 1
    assert "gramstyle: warning: --token: sent in plaintext to 192.0.2.1:50051" in err
    assert TOKEN not in err


def test_cli_health(plain_server, tls_server, pki, capsys, monkeypatch):
    monkeypatch.delenv("GRAMSTYLE_TOKEN", raising=False)
    plain = ["--server", f"127.0.0.1:{plain_server.port}"]
    assert main(["health", *plain]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    # Over TLS, without a token: health stays open to probes.
    assert main(["health", "--server", f"localhost:{tls_server.port}", "--tls-ca",
                 pki.path("ca")]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    plain_server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        assert main(["health", *plain]) == 1
        assert capsys.readouterr().out.strip() == "NOT_SERVING"
    finally:
        plain_server.health.set("", health_pb2.HealthCheckResponse.SERVING)
    assert main(["health", *plain, "--service", "no.such.Service"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert main(["health", "--server", f"127.0.0.1:{closed}", "--timeout", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert main(["health"]) == 2
    assert "--server: give the server to check" in capsys.readouterr().err
