"""The settings of ``gramstyle serve``, each declared once.

Every field of :class:`ServeConfig` carries a :class:`Setting` in its dataclass metadata: its
command-line flag, its environment variable (``GRAMSTYLE_`` and the flag's name in capitals,
``--queue-size`` is ``GRAMSTYLE_QUEUE_SIZE``), its default, its bounds and its help. Derived
from that declaration:

- the checks of a config, whoever builds it (:meth:`ServeConfig.__post_init__` raises
  :class:`SettingError` naming the field, the bound and the value);
- the ``serve`` parser and its ``--help`` (:mod:`gramstyle.cli.serve`);
- the environment variables (:mod:`gramstyle.cli.envflags`);
- the flag table of docs/service.md (:func:`flag_table`, checked by a test).

Adding a setting means: declare it here and use it. This module is torch-free: the CLI builds
its parser from it on a client-only install.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

from gramstyle.codec import RESULT_CHUNK_BYTES
from gramstyle.errors import FieldError
from gramstyle.images import DEFAULT_MAX_PIXELS
from gramstyle.options import (
    ARCHS,
    DEFAULT_ARCH,
    DEFAULT_DEVICE,
    DEFAULT_POOLING,
    DEFAULT_TARGET_CACHE_MB,
    DEFAULT_WEIGHTS,
    DEVICES,
    MAX_ITERATIONS,
    MAX_SIZE,
    POOLINGS,
)
from gramstyle.server.message_budget import DEFAULT_ARRIVAL_TIMEOUT_S
from gramstyle.sizes import parse_size

T = TypeVar("T")

#: Every setting's environment variable is this prefix and its flag's name.
ENV_PREFIX = "GRAMSTYLE_"
#: Send/receive limit, MiB: a request may carry several images (a 2048x2048 RGB PNG is at
#: most ~12.6 MB, incompressible noise; a 4096 px photo as PNG typically 20-40 MB), and a
#: 2048 px gradient is 50 MB of float32 (a larger one is refused before the work). Results
#: of any size arrive in chunks of RESULT_CHUNK_BYTES, so the limit never cuts them.
DEFAULT_MAX_MESSAGE_MB = 64
#: gRPC takes the message limit as a C int of bytes: 2047 MiB is the most that fits.
MAX_MESSAGE_MB = (2**31 - 1) // 2**20
#: Images a request may carry (content, style, init image and candidate together).
DEFAULT_MAX_IMAGES = 8
#: Streams one HTTP/2 connection may have open at once (grpc.max_concurrent_streams).
DEFAULT_MAX_CONCURRENT_STREAMS = 100
#: Connection age (s) after which the server asks the client to reconnect (GOAWAY), so that
#: clients balancing over DNS (a headless Service) find replicas added by a scale-up.
MAX_CONNECTION_AGE_S = 300.0
#: How long an HTTP connection may take to send a request's line and headers (s): ample for
#: any client, short enough that slow senders (slowloris) cannot pile up.
DEFAULT_HTTP_HEADER_TIMEOUT_S = 10.0
#: How long an HTTP request's body may take to arrive (s): a body at the default limit
#: (85 MiB of base64) at 1.5 MB/s.
DEFAULT_HTTP_BODY_TIMEOUT_S = 60.0
#: HTTP connections served at once (each is a file descriptor; the server raises its soft
#: descriptor limit to fit them when the hard limit allows).
DEFAULT_HTTP_MAX_CONNECTIONS = 1000
#: The most any memory setting may say, bytes (1 PiB): more than any machine, and far inside
#: the int64 that GetServerInfo reports it in.
_MAX_MEMORY = 2**50
#: The longest drain or connection age, seconds (a day).
_MAX_SECONDS = 86_400.0
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class Setting:
    """How one :class:`ServeConfig` field is set, checked and described.

    Attributes:
        flag: the command-line flag (None: set in code only, e.g. by tests).
        help: what it does, one sentence or two, without the default (that is appended).
        group: the ``--help`` section: 'network', 'server' or 'security'.
        parse: text (flag or variable) to value; None: the text itself. Switches (a bool
            default) take no text on the command line, and 1/true/yes/on or 0/false/no/off
            from the environment.
        low, high: bounds of a numeric setting, inclusive (None: that side is open).
        choices: the values allowed, after ``parse``.
        metavar: the value's name in ``--help``.
        default_text: how ``--help`` and the docs show the default when the value alone does
            not say it (a None default, a derived one).
        range_text: how the docs show the bounds when the numbers alone read badly.
        name, default: the field's; filled in by :meth:`ServeConfig.settings`.
    """

    flag: str | None
    help: str
    group: str = "server"
    parse: Callable[[str], Any] | None = None
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    default_text: str | None = None
    range_text: str | None = None
    name: str = ""
    default: Any = None

    @property
    def variable(self) -> str | None:
        """The environment variable: ``--queue-size`` -> ``GRAMSTYLE_QUEUE_SIZE``."""
        if self.flag is None:
            return None
        return ENV_PREFIX + self.flag.lstrip("-").replace("-", "_").upper()

    @property
    def switch(self) -> bool:
        """An on/off flag: given means on."""
        return isinstance(self.default, bool)

    def shown_default(self) -> str:
        """The default as ``--help`` and the docs show it."""
        if self.default_text is not None:
            return self.default_text
        if self.switch:
            return "on" if self.default else "off"
        if self.default is None:
            return "off"
        if isinstance(self.default, tuple):
            return ",".join(map(str, self.default))
        if isinstance(self.default, float) and self.default.is_integer():
            return str(int(self.default))
        return str(self.default)

    def allowed(self) -> str:
        """The values allowed, as the docs show them ('' when anything goes)."""
        if self.range_text is not None:
            return self.range_text
        if self.choices is not None:
            return ", ".join(self.choices)
        if self.low is not None and self.high is not None:
            return f"{_number(self.low)} to {_number(self.high)}"
        if self.low is not None:
            return f">= {_number(self.low)}"
        return ""

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed, or None when it is."""
        if value is None or self.switch:
            return None
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}, got {value!r}"
        if self.low is None and self.high is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return f"must be a number, got {value!r}"
        if self.low is not None and value < self.low:
            return f"must be >= {_number(self.low)}, got {value}"
        if self.high is not None and value > self.high:
            return f"must be <= {_number(self.high)}, got {value}"
        return None


class SettingError(FieldError):
    """A setting out of its bounds or choices: ``.field`` (the ServeConfig field; also
    ``.name``), ``.value`` and ``.problem`` ('must be >= 1, got 0'); the message is
    'name: problem'."""

    def __init__(self, name: str, value: Any, problem: str):
        super().__init__(name, problem, value)
        self.name = name


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _setting(default: T, flag: str | None, help: str, **kwargs: Any) -> T:
    """A dataclass field with its :class:`Setting` (typed as its value, for the checker)."""
    return field(default=default, metadata={"setting": Setting(flag, help, **kwargs)})


def _one_weights(text: str) -> tuple[str, ...]:
    """``--weights`` names one model; the config holds a tuple (a server may load several)."""
    return (text,)


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``gramstyle serve`` takes; see :class:`Setting` and ``--help``.

    Built in code, a bad value raises :class:`SettingError` naming the field (``workers:
    must be >= 1, got 0``); the CLI names the flag or the variable instead.
    """

    # -------------------------------------------------------------- network
    arch: str = _setting(DEFAULT_ARCH, "--arch", "the feature extractor network",
                         group="network", choices=ARCHS)
    #: One or more weights, all with ``arch``; the first is the default model.
    weights: tuple[str, ...] = _setting(
        (DEFAULT_WEIGHTS,), "--weights",
        "imagenet (torchvision download cache), random (seeded RandomNet) or a path to a "
        "VGG / VGG-features state_dict", group="network", parse=_one_weights)
    pooling: str = _setting(DEFAULT_POOLING, "--pooling", "max or avg pooling",
                            group="network", choices=POOLINGS)
    device: str = _setting(DEFAULT_DEVICE, "--device",
                           "auto (CUDA when torch sees one), cpu or cuda", group="network",
                           choices=DEVICES)

    # -------------------------------------------------------------- server
    host: str = _setting("[::]", "--host", "address to listen on ([::]: every interface, "
                         "IPv4 and IPv6; 127.0.0.1 for this machine only)")
    port: int = _setting(50051, "--port", "port; 0 picks a free one and the ready line "
                         "prints it", parse=int, low=0, high=65535)
    workers: int = _setting(1, "--workers", "optimisations that run at once (on CPU one run "
                            "already uses every core)", parse=int, low=1, high=256)
    queue_size: int = _setting(4, "--queue-size", "requests that may wait for a worker; "
                               "beyond that the server answers RESOURCE_EXHAUSTED at once",
                               parse=int, low=0, high=10_000)
    max_pixels: int = _setting(DEFAULT_MAX_PIXELS, "--max-pixels",
                               "largest width x height of any input image, checked from the "
                               "header before decoding", parse=int, low=1, high=2**32)
    max_size: int = _setting(MAX_SIZE, "--max-size", "largest output long side, pixels",
                             parse=int, low=16, high=MAX_SIZE)
    max_iterations: int = _setting(MAX_ITERATIONS, "--max-iterations",
                                   "most iterations per request", parse=int, low=1,
                                   high=MAX_ITERATIONS)
    max_message_mb: int = _setting(
        DEFAULT_MAX_MESSAGE_MB, "--max-message-mb",
        "gRPC send/receive message limit, MiB (64: several input images, or a 2048 px "
        "gradient; result images of any size arrive in 1 MiB chunks; the client library "
        "uses the same default)",
        parse=int, low=1, high=MAX_MESSAGE_MB, metavar="MIB")
    grace_s: float = _setting(30.0, "--grace", "on SIGTERM, how long in-flight calls may take "
                              "to finish", parse=float, low=0.0, high=_MAX_SECONDS,
                              metavar="SECONDS")
    #: Budget of the target cache the loaded models share (MiB; 0 turns it off).
    target_cache_mb: int = _setting(
        DEFAULT_TARGET_CACHE_MB, "--target-cache-mb",
        "memory for the content features and style Gram targets kept across requests, so "
        "that repeated targets (ComputeLosses against the same images, one style for many "
        "images) skip their network passes; LRU, 0 turns it off", parse=int, low=0,
        high=2**20, metavar="MIB")
    max_images: int = _setting(DEFAULT_MAX_IMAGES, "--max-images",
                               "images per request: content, style, init image and candidate "
                               "together, counted before any is decoded", parse=int, low=1,
                               high=1024, metavar="N")
    #: Largest estimated peak memory of one request, bytes (None: the memory budget).
    max_request_memory: int | None = _setting(
        None, "--max-request-memory",
        "largest peak memory one request may need, estimated from the image headers and "
        "options before decoding (512M, 4G, ...; MiB without a unit); a request over it gets "
        "INVALID_ARGUMENT naming what to lower", parse=parse_size, low=1, high=_MAX_MEMORY,
        metavar="SIZE", default_text="the memory budget", range_text="up to 1 PiB")
    #: What the running requests' estimates may add up to, bytes (None: derived from the
    #: machine's memory, see :func:`gramstyle.server.admission.default_memory_budget`).
    memory_budget: int | None = _setting(
        None, "--memory-budget",
        "what the estimates of the requests running at once may add up to (512M, 8G, ...); "
        "a request that would exceed it waits in the queue; the ready line shows it",
        parse=parse_size, low=1, high=_MAX_MEMORY, metavar="SIZE", range_text="up to 1 PiB",
        default_text="80% of the machine's (or container's) memory, less the loaded models "
                     "and the target cache")
    #: What request messages in flight (being received, or parsed and held by their calls)
    #: may add up to, bytes, besides the memory budget (None: see
    #: :func:`gramstyle.server.message_budget.default_message_budget`).
    message_budget: int | None = _setting(
        None, "--message-budget",
        "what the request messages in flight may hold besides the memory budget: each "
        "message being received reserves 3 x --max-message-mb and, once parsed, 3 x its size "
        "until its call ends (queued calls included); calls beyond it wait, up to "
        "--message-timeout", parse=parse_size, low=1, high=_MAX_MEMORY, metavar="SIZE",
        range_text="up to 1 PiB",
        default_text="25% of the memory budget, at least six times the message limit")
    #: Seconds a request message may take to arrive (the wait for the message budget too).
    message_timeout_s: float = _setting(
        DEFAULT_ARRIVAL_TIMEOUT_S, "--message-timeout",
        "how long a request message may take to arrive, the wait for the message budget "
        "included", parse=float, low=0.1, high=_MAX_SECONDS, metavar="SECONDS")
    max_concurrent_streams: int = _setting(
        DEFAULT_MAX_CONCURRENT_STREAMS, "--max-concurrent-streams",
        "streams one client connection may have open at once (HTTP/2 "
        "SETTINGS_MAX_CONCURRENT_STREAMS); a client queues the excess, the server refuses "
        "streams beyond it", parse=int, low=1, high=100_000, metavar="N")
    metrics_port: int | None = _setting(
        None, "--metrics-port", "serve Prometheus metrics at http://METRICS_HOST:PORT/metrics",
        parse=int, low=0, high=65535, metavar="PORT")
    #: Where the metrics listen; None: ``host``, or loopback when ``host`` is every interface.
    metrics_host: str | None = _setting(
        None, "--metrics-host", "address the metrics listen on (0.0.0.0 to expose them)",
        metavar="HOST",
        default_text="--host, or 127.0.0.1 when --host is every interface")
    log_level: str = _setting("INFO", "--log-level", "DEBUG, INFO, WARNING or ERROR, any case",
                              parse=str.upper, choices=_LOG_LEVELS)
    #: "text" (key=value) or "json" (one object per line).
    log_format: str = _setting("text", "--log-format", "text: one line per request of "
                               "key=value fields; json: one JSON object per line",
                               choices=_LOG_FORMATS)
    #: A plaintext port serving only grpc.health.v1 (for kubelet probes); None: none.
    health_port: int | None = _setting(
        None, "--health-port",
        "also serve grpc.health.v1, and only that, in plaintext on this port (for Kubernetes "
        "gRPC probes, which cannot do TLS); it answers what the main port would, NOT_SERVING "
        "while draining included", parse=int, low=0, high=65535, metavar="PORT")
    #: Also serve HTTP/JSON and the page on this port (server/http.py); None: none.
    http_port: int | None = _setting(
        None, "--http-port",
        "also serve HTTP/JSON (POST /v1/stylize as server-sent events, /v1/losses, /v1/info, "
        "/healthz, /readyz) and a page at / on this port, with the same TLS, tokens and "
        "limits; see docs/http.md", parse=int, low=0, high=65535, metavar="PORT")
    #: How long (s) an HTTP connection may take to send a request line and headers.
    http_header_timeout_s: float = _setting(
        DEFAULT_HTTP_HEADER_TIMEOUT_S, "--http-header-timeout",
        "HTTP: how long a connection may take to send a request's line and headers, from "
        "when it opens or from its previous answer; then it is closed (408 if part of a "
        "request came)", parse=float, low=0.1, high=_MAX_SECONDS, metavar="SECONDS")
    #: How long (s) an HTTP request's body may take to arrive in full.
    http_body_timeout_s: float = _setting(
        DEFAULT_HTTP_BODY_TIMEOUT_S, "--http-body-timeout",
        "HTTP: how long a request's body may take to arrive in full; then the call is "
        "answered 408 and the connection closed", parse=float, low=0.1, high=_MAX_SECONDS,
        metavar="SECONDS")
    #: HTTP connections served at once; a request on one beyond it is answered 503.
    http_max_connections: int = _setting(
        DEFAULT_HTTP_MAX_CONNECTIONS, "--http-max-connections",
        "HTTP connections open at once; a request on a connection beyond them is answered "
        "503 UNAVAILABLE at once and that connection closed", parse=int, low=1,
        high=100_000, metavar="N")
    #: The server closes (GOAWAY) a client connection after about this long, seconds.
    max_connection_age_s: float = _setting(
        MAX_CONNECTION_AGE_S, None,
        "close each client connection after about this long, so that dns:/// clients "
        "resolve again and find new replicas; calls in flight on it go on",
        low=0.01, high=_MAX_SECONDS)

    #: A Stylize result image longer than this (encoded, KiB) is sent as ResultChunk
    #: messages of at most this size (and at most a quarter of the message limit).
    result_chunk_kb: int = _setting(
        RESULT_CHUNK_BYTES // 2**10, "--result-chunk-kb",
        "a Stylize result image longer than this, encoded, is sent in pieces of at most this "
        "size (and a quarter of --max-message-mb) before its Result, so that no message "
        "nears a client's limit (docs/service.md)", parse=int, low=1,
        high=MAX_MESSAGE_MB * 2**10 // 4, metavar="KIB")

    # -------------------------------------------------------------- security
    #: TLS: the certificate chain and key (PEM paths); with ``tls_client_ca``, mutual TLS.
    tls_cert: str | None = _setting(
        None, "--tls-cert", "serve TLS with this PEM certificate chain (with --tls-key); "
        "SIGHUP or a change of the file on disk loads a new one for new connections (calls "
        "in flight go on)", group="security", metavar="FILE")
    tls_key: str | None = _setting(None, "--tls-key", "the PEM private key of --tls-cert",
                                   group="security", metavar="FILE")
    tls_client_ca: str | None = _setting(
        None, "--tls-client-ca", "mutual TLS: require client certificates signed by a CA in "
        "this PEM file", group="security", metavar="FILE")
    #: Bearer tokens file (one per line); None: no token needed.
    auth_tokens: str | None = _setting(
        None, "--auth-tokens", "require 'authorization: Bearer <token>' for one of the "
        "tokens in this file (one per line, '#' comments; reloaded on SIGHUP or when it "
        "changes); health answers without one", group="security", metavar="FILE")
    public_reflection: bool = _setting(
        False, "--public-reflection", "with --auth-tokens: let reflection and GetServerInfo "
        "answer without a token", group="security")
    insecure_auth: bool = _setting(
        False, "--insecure-auth", "allow --auth-tokens without TLS on an address other than "
        "loopback (tokens travel readable; for a mesh that encrypts), with a warning",
        group="security")

    def __post_init__(self) -> None:
        for setting in self.settings():
            value = getattr(self, setting.name)
            problem = setting.problem(value)
            if problem is not None:
                raise SettingError(setting.name, value, problem)

    @property
    def max_message_bytes(self) -> int:
        """The send/receive message limit in bytes."""
        return self.max_message_mb * 2**20

    @property
    def result_chunk_bytes(self) -> int:
        """The largest piece of a result image per Stylize stream message, bytes."""
        return self.result_chunk_kb * 2**10

    @classmethod
    def settings(cls) -> tuple[Setting, ...]:
        """Every field's :class:`Setting`, in declaration order, with name and default."""
        return _declared_settings()


@functools.cache
def _declared_settings() -> tuple[Setting, ...]:
    return tuple(replace(f.metadata["setting"], name=f.name, default=f.default)
                 for f in fields(ServeConfig))


def flag_table() -> str:
    """The flag table of docs/service.md, generated from the declarations."""
    rows = ["| flag | environment variable | default | allowed | meaning |",
            "|---|---|---|---|---|"]
    for setting in ServeConfig.settings():
        if setting.flag is None:
            continue
        literal = setting.default_text is None and setting.default is not None
        default = setting.shown_default()
        shown = f"`{default}`" if literal and not setting.switch else default
        rows.append(f"| `{setting.flag}` | `{setting.variable}` | {shown} | "
                    f"{setting.allowed()} | {setting.help} |")
    return "\n".join(rows)


__all__ = ["DEFAULT_HTTP_BODY_TIMEOUT_S", "DEFAULT_HTTP_HEADER_TIMEOUT_S",
           "DEFAULT_HTTP_MAX_CONNECTIONS", "DEFAULT_MAX_CONCURRENT_STREAMS", "DEFAULT_MAX_IMAGES",
           "DEFAULT_MAX_MESSAGE_MB", "ENV_PREFIX", "MAX_CONNECTION_AGE_S", "MAX_MESSAGE_MB",
           "ServeConfig", "Setting", "SettingError", "flag_table"]
