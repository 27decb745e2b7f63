"""Shared fixtures and helpers, defined once for the whole suite:

- the shared test images and weights, and engines loaded once per session;
- small test images: :func:`shrink`, :func:`encode`, :func:`png`, :func:`small_png`, :func:`noise`
  (test modules import them with ``from conftest import ...``);
- test certificates: :class:`PKI` and its ``pki`` fixture, :func:`make_certificate`;
- in-process servers: :func:`build_server` and the module-scoped ``server`` fixture (a module
  sets ``SERVER_ENGINES`` / ``SERVER_SETTINGS`` to change what it serves);
- a spy at the engine boundary (what the gRPC servicer passes to the engine, and when it stops).

Tests follow the packages: ``core/`` (options, images, codec), ``engine/``, ``kernels/``,
``server/`` (service, security, hardening, fuzz, replicas), ``client/`` and ``cli/``.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    candidates = [os.environ.get("GRAMSTYLE_SHARED"), REPO.parent / "shared", "/work/shared"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "images").is_dir():
            return Path(candidate)
    raise RuntimeError(f"shared test data not found in {candidates}; set GRAMSTYLE_SHARED")


SHARED = _shared_dir()
CONTENT = SHARED / "images" / "content"
STYLE = SHARED / "images" / "style"
VGG16_WEIGHTS = SHARED / "models" / "vgg16-hed-bsds500.pth"


@pytest.fixture(scope="session")
def images() -> dict[str, Path]:
    return {
        "cat": CONTENT / "chelsea.png",
        "coffee": CONTENT / "coffee.png",
        "astronaut": CONTENT / "astronaut.png",
        "rocket": CONTENT / "rocket.jpg",
        "starry": STYLE / "starry_night.jpg",
        "scream": STYLE / "the_scream.jpg",
        "shipwreck": STYLE / "shipwreck.jpg",
    }


@pytest.fixture(scope="session")
def vgg16_weights() -> Path:
    assert VGG16_WEIGHTS.is_file(), f"missing {VGG16_WEIGHTS}"
    return VGG16_WEIGHTS


@pytest.fixture(scope="session")
def random_engine():
    """VGG19 with seeded random weights, on the CPU."""
    from gramstyle.engine import StyleTransfer

    return StyleTransfer(arch="vgg19", weights="random", device="cpu")


@pytest.fixture(scope="session")
def hed_engine(vgg16_weights):
    """The shared, really trained VGG16 (HED backbone), on the CPU."""
    from gramstyle.engine import StyleTransfer

    return StyleTransfer(arch="vgg16", weights=str(vgg16_weights), device="cpu")


# ------------------------------------------------------------------------- small test images


def shrink(path: Path | str, size: int = 64) -> Image.Image:
    """The image at ``path`` decoded as the service does, its long side resized to ``size`` px."""
    from gramstyle.images import load_image, resize_long_side

    return resize_long_side(load_image(path), size)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: Any) -> bytes:
    """``image`` encoded as ``fmt`` (a Pillow format name); ``kwargs`` go to ``Image.save``."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png(image: Image.Image | np.ndarray) -> bytes:
    """PNG bytes of a PIL image or of a uint8-valued [H, W, 3] array."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    return encode(image, "PNG")


def small_png(path: Path | str, size: int = 64) -> bytes:
    """PNG bytes of :func:`shrink` (``path``, ``size``)."""
    return png(shrink(path, size))


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """Uniform RGB noise, ``width`` x ``height`` px, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


#: A tiny Encapsulated PostScript file: a format Pillow knows (through Ghostscript) and that
#: gramstyle's allowlist must refuse.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto showpage\n"


# ----------------------------------------------------------------------- test certificates

#: The DNS names of every test server certificate (plus the IP address 127.0.0.1).
SERVER_NAMES = ("localhost", "gramstyle.internal")


def make_key():
    """A fresh P-256 private key."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def make_certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool = False,
                     server: bool = False, usage=None, valid_from: float = -300,
                     valid_for: float = 86_400):
    """An X.509 certificate for ``key`` named ``subject``, signed by ``issuer_key`` as
    ``issuer``: a CA when ``ca``; a server certificate for :data:`SERVER_NAMES` and 127.0.0.1
    when ``server``; ``usage`` an ExtendedKeyUsageOID. Valid from ``valid_from`` seconds
    from now, for ``valid_for`` seconds (negative values make expired or not-yet-valid
    certificates)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    start = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=valid_from)
    builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start)
               .not_valid_after(start + datetime.timedelta(seconds=valid_for))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [*(x509.DNSName(n) for n in SERVER_NAMES),
             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def to_pem(obj) -> bytes:
    """PEM bytes of a certificate or (unencrypted PKCS#8) of a private key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class PKI:
    """Test certificates, as PEM bytes (``pem[name]``) and as files (``path(name)``) under
    ``folder``: two server CAs (``ca``, ``ca2``), each with a server certificate
    (``server``/``server2`` with ``server_key``/``server2_key``), a client CA
    (``client_ca``) with a client certificate (``client`` + ``client_key``), and a
    self-signed client certificate no CA vouches for (``rogue`` + ``rogue_key``)."""

    def __init__(self, folder: Path):
        from cryptography.x509.oid import ExtendedKeyUsageOID

        self.folder = folder
        pem: dict[str, bytes] = {}
        for suffix in ("", "2"):
            ca_key, server_key = make_key(), make_key()
            ca = make_certificate(f"server CA{suffix}", ca_key, f"server CA{suffix}", ca_key,
                                  ca=True)
            pem[f"ca{suffix}"] = to_pem(ca)
            pem[f"server{suffix}"] = to_pem(make_certificate(
                "gramstyle", server_key, f"server CA{suffix}", ca_key, server=True,
                usage=ExtendedKeyUsageOID.SERVER_AUTH))
            pem[f"server{suffix}_key"] = to_pem(server_key)
        client_ca_key, client_key, rogue_key = make_key(), make_key(), make_key()
        pem["client_ca"] = to_pem(make_certificate("client CA", client_ca_key, "client CA",
                                                   client_ca_key, ca=True))
        pem["client"] = to_pem(make_certificate("backend", client_key, "client CA",
                                                client_ca_key,
                                                usage=ExtendedKeyUsageOID.CLIENT_AUTH))
        pem["client_key"] = to_pem(client_key)
        pem["rogue"] = to_pem(make_certificate("rogue", rogue_key, "rogue", rogue_key,
                                               usage=ExtendedKeyUsageOID.CLIENT_AUTH))
        pem["rogue_key"] = to_pem(rogue_key)
        self.pem = pem
        for name, data in pem.items():
            (folder / f"{name}.pem").write_bytes(data)

    def path(self, name: str) -> str:
        return str(self.folder / f"{name}.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A module's :class:`PKI`."""
    return PKI(tmp_path_factory.mktemp("pki"))


# ------------------------------------------------------------------------ in-process servers


def build_server(engines: list, *, tls: Any = None, tokens: Any = None, **settings: Any):
    """An in-process ``GramstyleServer`` (not started) over ``engines``, on 127.0.0.1 and an
    ephemeral port unless ``settings`` say otherwise. ``settings`` are ``ServeConfig`` fields
    (workers, queue_size, max_images, ...); ``tls`` and ``tokens`` the server's TLS files and
    token store."""
    from gramstyle.server.config import ServeConfig
    from gramstyle.server.serve import GramstyleServer

    config = ServeConfig(**{"host": "127.0.0.1", "port": 0, **settings})
    return GramstyleServer(list(engines), config, tls=tls, tokens=tokens)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest):
    """The test module's started server, stopped after the module. It serves the engine
    fixtures named in the module's ``SERVER_ENGINES`` (default: the random VGG19) with one
    worker and one queue slot, so that admission tests are exact, updated by the module's
    ``SERVER_SETTINGS``."""
    names = getattr(request.module, "SERVER_ENGINES", ("random_engine",))
    engines = [request.getfixturevalue(name) for name in names]
    settings = {"workers": 1, "queue_size": 1, **getattr(request.module, "SERVER_SETTINGS", {})}
    srv = build_server(engines, **settings).start()
    yield srv
    srv.stop(grace=None)


@pytest.fixture(scope="module")
def stub(server):
    """A StyleTransferService stub on a plaintext channel to the module's server."""
    import grpc

    from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.StyleTransferServiceStub(channel)


@pytest.fixture
def stylize_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every in-process StyleTransfer.stylize call of this test
    (the call still runs)."""
    from gramstyle.engine.transfer import StyleTransfer

    seen: list[dict] = []
    real = StyleTransfer.stylize

    def stylize(self, *args, **kwargs):
        seen.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StyleTransfer, "stylize", stylize)
    return seen


@pytest.fixture(scope="module")
def http(server):
    """An httpx client of the module's server's HTTP front (the module's SERVER_SETTINGS
    must set ``http_port``)."""
    import httpx

    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=60) as client:
        yield client


# --------------------------------------------------------------------------- measuring


def can_reset_peak_rss() -> bool:
    """Whether this Linux lets a process reset its peak RSS (/proc/self/clear_refs, 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM" in Path("/proc/self/status").read_text()
    except OSError:
        return False


def count_validation(monkeypatch: pytest.MonkeyPatch, engine: Any
                     ) -> tuple[list[str], list[str]]:
    """(the option names ``gramstyle.options.check_value`` checks, the fields whose layer
    names ``engine``'s network resolves), recorded from now on."""
    import gramstyle.options as options_module

    checked: list[str] = []
    real = options_module.check_value
    monkeypatch.setattr(options_module, "check_value",
                        lambda name, *args: (checked.append(name), real(name, *args))[1])
    resolved: list[str] = []
    real_resolve = engine.extractor.resolve_all
    monkeypatch.setattr(engine.extractor, "resolve_all",
                        lambda layers, field: (resolved.append(field),
                                               real_resolve(layers, field))[1])
    return checked, resolved


# ------------------------------------------------------------------ a spy at the engine boundary


@dataclass
class SpiedCall:
    """One call into an engine, as the spy saw it."""

    method: str  # "stylize" or "compute_losses"
    #: A copy of the options the engine received.
    options: Any
    kwargs: dict
    #: should_stop polls that let an optimisation step run (the engine polls before each).
    steps: int = 0
    #: ... of which after the test set ``EngineSpy.caller_gone``.
    steps_after_caller_gone: int = 0
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)


class EngineSpy:
    """Wraps ``engine.stylize`` and ``engine.compute_losses`` -- the calls the gRPC servicer
    makes -- to record what arrived and how each run went, without changing either.

    ``on_progress(call, progress)``, when set, runs in the worker thread before each progress
    report reaches the servicer (e.g. a barrier). Set ``caller_gone`` when the caller has seen
    its call end (deadline, cancel): steps started afterwards are counted.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, engine: Any):
        self.calls: list[SpiedCall] = []
        self.caller_gone = threading.Event()
        self.on_progress: Callable[[SpiedCall, Any], None] | None = None
        self._lock = threading.Lock()
        for method in ("stylize", "compute_losses"):
            monkeypatch.setattr(engine, method, self._wrap(method, getattr(engine, method)))

    def _wrap(self, method: str, real: Callable) -> Callable:
        signature = inspect.signature(real)

        def call_engine(*args: Any, **kwargs: Any) -> Any:
            options = signature.bind(*args, **kwargs).arguments.get("options")
            call = SpiedCall(method, dataclasses.replace(options) if options else None,
                             dict(kwargs))
            with self._lock:
                self.calls.append(call)
            should_stop, progress = kwargs.get("should_stop"), kwargs.get("progress")

            def polled() -> bool:
                stop = bool(should_stop is not None and should_stop())
                if not stop:
                    call.steps += 1
                    call.steps_after_caller_gone += self.caller_gone.is_set()
                return stop

            def progressed(p: Any) -> None:
                if self.on_progress is not None:
                    self.on_progress(call, p)
                if progress is not None:
                    progress(p)

            if method == "stylize":
                kwargs["should_stop"], kwargs["progress"] = polled, progressed
            try:
                return real(*args, **kwargs)
            except BaseException as exc:
                call.error = exc
                raise
            finally:
                call.finished.set()

        return call_engine

    def last(self, method: str = "stylize", timeout: float = 60) -> SpiedCall:
        """The latest call of ``method``, once it has finished."""
        calls = [c for c in self.calls if c.method == method]
        assert calls, f"the engine's {method} was never called"
        assert calls[-1].finished.wait(timeout), f"the engine's {method} did not return"
        return calls[-1]


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    """Poll ``condition`` until it is truthy; fail after a generous ``timeout`` (s)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(name="wait_for")
def wait_for_fixture() -> Callable[..., Any]:
    """:func:`wait_for`, as a fixture (conftest.py is not meant to be imported)."""
    return wait_for


@pytest.fixture
def spy(monkeypatch) -> Callable[[Any], EngineSpy]:
    """``spy(engine)``: an :class:`EngineSpy` on that engine for this test."""
    return lambda engine: EngineSpy(monkeypatch, engine)
