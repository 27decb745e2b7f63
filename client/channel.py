"""Channel set-up shared by the sync and async clients: targets, load balancing, message-size
limits, TLS credentials and the bearer token.

Targets:

- ``"host:port"``: one name; gRPC's DNS resolver may return several addresses, and the
  client spreads calls over all of them (round_robin).
- ``"dns:///gramstyle.ns.svc.cluster.local:50051"``: the same, spelled out. With a Kubernetes
  *headless* Service this resolves to every pod, so calls are balanced per request rather
  than pinned to one pod by an L4 balancer.
- Several addresses, as a list or comma-separated: ``"127.0.0.1:5001,127.0.0.1:5002"`` or
  ``["10.0.0.5:50051", "10.0.0.6:50051"]``. They become gRPC's static ``ipv4:``/``ipv6:``
  target (host names in such a list are resolved once, here).
- Any other gRPC target URI (``ipv4:...``, ``unix:...``) is used as is.

Retries are not configured here: the client repeats a call that fails with UNAVAILABLE
itself (:class:`gramstyle.client.base.RetryBudget`), because gRPC's own retry policy stops
once the server has sent response headers, so it cannot repeat a Stylize stream whose server
died mid-run. gRPC's *transparent* retries (a call that never reached a server application,
e.g. one that raced a GOAWAY) stay on; they are invisible and always safe.

TLS: :func:`tls_credentials` builds the channel credentials from ``tls``/``tls_ca``/
``tls_cert``/``tls_key`` (paths or PEM bytes); :func:`bearer_metadata` the token header.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import grpc

from gramstyle.errors import FieldError

#: A PEM input: a file path, or the PEM contents themselves (bytes, or a str that holds a
#: ``-----BEGIN`` line).
PemSource = str | os.PathLike[str] | bytes

#: Send/receive limit; matches the server's default (result images of any size arrive in
#: chunks far below it).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE = "gramstyle.v1.StyleTransferService"


def _split_host_port(address: str) -> tuple[str, str]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise FieldError("server", f"expected HOST:PORT, got {address!r}", address)
    return host.strip("[]"), port


def normalize_target(target: str | Sequence[str]) -> str:
    """A gRPC target string for one address, a URI, or several addresses."""
    if isinstance(target, str):
        if "://" in target or target.split(":", 1)[0] in ("ipv4", "ipv6", "unix", "dns"):
            return target
        addresses = [a for a in target.split(",") if a.strip()]
    else:
        addresses = [str(a) for a in target]
    if not addresses:
        raise FieldError("server", f"no address given in {target!r}", target)
    if len(addresses) == 1:
        _split_host_port(addresses[0])  # fail early on "localhost" without a port
        return addresses[0].strip()
    v4, v6 = [], []
    for address in addresses:
        host, port = _split_host_port(address)
        try:
            ips = [ipaddress.ip_address(host)]
        except ValueError:  # a host name: resolve it now (static list, no re-resolution)
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            ips = [ipaddress.ip_address(info[4][0]) for info in infos]
        for ip in dict.fromkeys(ips):
            (v4 if ip.version == 4 else v6).append(
                f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}")
    # A static target holds one address family; prefer IPv4 when both occur.
    return "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)


def service_config() -> str:
    """The JSON service config: round_robin over every address the target resolves to."""
    return json.dumps({
        # No client-side healthCheckConfig: it keeps a Health/Watch stream open per
        # connection, which would hold a draining server until its grace period ends. A
        # draining server refuses new calls (GOAWAY), round_robin drops it and the call goes
        # to another replica.
        "loadBalancingConfig": [{"round_robin": {}}],
    })


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                    tls_server_name: str | None = None) -> list[tuple[str, object]]:
    """Channel arguments for ``grpc.*_channel`` / ``grpc.aio.*_channel``.

    ``tls_server_name`` overrides the name the server's certificate is checked against
    (default: the host of the target), e.g. when dialing pod IPs directly.
    """
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.service_config", service_config()),
        # Our config, not one published in DNS TXT records.
        ("grpc.service_config_disable_resolution", 1),
        # Transparent retries (calls no server application saw) need the retry machinery;
        # a request is replayable only while it fits the retry buffer (default 256 KiB,
        # less than one image), so size the buffer for the largest request.
        ("grpc.enable_retries", 1),
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),
    ]
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return options


# ---------------------------------------------------------------------------- TLS, tokens

#: What each PEM input must contain, and what to call it in an error.
_PEM_KINDS = {"tls_ca": (b"-----BEGIN CERTIFICATE-----", "certificate"),
              "tls_cert": (b"-----BEGIN CERTIFICATE-----", "certificate"),
              "tls_key": (b"PRIVATE KEY-----", "private key")}


def read_pem(source: PemSource, field: str) -> bytes:
    """The PEM bytes of ``source`` (a path, or PEM contents), checked to hold a PEM block of
    the kind ``field`` needs (tls_ca/tls_cert: a certificate; tls_key: a private key).
    Errors name the field and the path, never the contents."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, where = bytes(source), f"the {len(source)} bytes given"
    elif isinstance(source, str) and "-----BEGIN" in source:
        data, where = source.encode(), "the PEM text given"
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        where = repr(path)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise FieldError(field, f"cannot read {path!r}: {exc.strerror or exc}",
                             path) from None
    else:
        raise TypeError(f"{field}: expected a file path or PEM bytes, got "
                        f"{type(source).__name__}")
    marker, what = _PEM_KINDS[field]
    if marker not in data:
        raise FieldError(field, f"{where} is not a PEM {what} (no "
                         f"'-----BEGIN ...{what.upper()}-----' line)")
    return data


def tls_credentials(tls: bool = False, tls_ca: PemSource | None = None,
                    tls_cert: PemSource | None = None, tls_key: PemSource | None = None
                    ) -> grpc.ChannelCredentials | None:
    """Channel credentials, or None for plaintext.

    ``tls=True`` alone trusts the system roots (those gRPC bundles, or the file in
    ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``); ``tls_ca`` trusts that CA instead; ``tls_cert`` +
    ``tls_key`` present a client certificate (mutual TLS). Any of the three implies TLS.
    """
    if tls_ca is None and tls_cert is None and tls_key is None:
        return grpc.ssl_channel_credentials() if tls else None
    if (tls_cert is None) != (tls_key is None):
        missing = "tls_key" if tls_key is None else "tls_cert"
        raise FieldError(missing, f"mutual TLS needs both tls_cert and tls_key; "
                         f"{missing} is missing")
    return grpc.ssl_channel_credentials(
        root_certificates=None if tls_ca is None else read_pem(tls_ca, "tls_ca"),
        private_key=None if tls_key is None else read_pem(tls_key, "tls_key"),
        certificate_chain=None if tls_cert is None else read_pem(tls_cert, "tls_cert"))


def bearer_metadata(token: str) -> tuple[str, str]:
    """The ``authorization: Bearer <token>`` metadata pair. The token itself never appears
    in an error message."""
    if not isinstance(token, str) or not token or not token.isascii() \
            or not token.isprintable() or any(c.isspace() for c in token):
        raise FieldError("token", "must be a non-empty string of printable ASCII characters "
                         "without spaces (the value is not shown)")
    return ("authorization", f"Bearer {token}")


def is_loopback(target: str) -> bool:
    """True when every address of a normalised target is on this machine (localhost, a
    loopback IP, or a unix socket): there, plaintext does not leave the host."""
    scheme, sep, rest = target.partition(":")
    if sep and scheme == "unix":
        return True
    if sep and scheme in ("ipv4", "ipv6"):
        addresses = rest.split(",")
    elif sep and scheme == "dns":
        addresses = [rest.lstrip("/").split("/", 1)[-1]]
    else:
        addresses = [target]
    for address in addresses:
        host = address.rpartition(":")[0].strip("[]") or address
        if host == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:
            return False
    return True
