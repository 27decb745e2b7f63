"""The server side of TLS, mutual TLS and bearer tokens (``gramstyle serve --tls-cert/--tls-key/
--tls-client-ca/--auth-tokens``).

- :class:`TlsFiles` reads and checks the PEM files and hands gRPC *dynamic* server
  credentials (``grpc.dynamic_ssl_server_credentials``): gRPC asks the fetcher for the
  certificate configuration at every new TLS handshake, and the fetcher answers with a new
  one after :meth:`TlsFiles.reload` (SIGHUP) or when the files changed on disk (a Kubernetes
  Secret volume swaps them in place, cert-manager renews). Connections already open keep
  their session, so calls in flight are not dropped. Whether client certificates are
  required (mutual TLS) is fixed at start-up; the client CA itself may rotate.
- :class:`TokenStore` holds the accepted bearer tokens (one per line, ``#`` comments) as
  SHA-256 digests and compares the presented one against each with
  :func:`hmac.compare_digest`, always all of them: the time does not depend on which token
  matched or on how much of it did. Tokens never appear in a log line or an error, not even
  in part; errors name the file and the line number.
- :class:`AuthInterceptor` (grpc.aio) answers UNAUTHENTICATED "missing or invalid bearer
  token" to a call without ``authorization: Bearer <token>`` for an accepted token. Health
  (``grpc.health.v1``) is always open, for probes; reflection and GetServerInfo are open only
  with ``public_reflection``.

A file that cannot be read or checked at start-up raises ValueError naming the option and
the file (``tls_cert: cannot read 'x.pem': ...``; the CLI turns it into ``--tls-cert: ...``,
exit 2). At a reload the previous files stay in use and the problem is logged.

Certificates: a leaf that has expired, is not valid yet, or does not match its key is
refused, at start-up and at a reload (the previous one stays; the log and
``gramstyle_tls_reload_failures_total{reason}`` say why), and
``gramstyle_tls_certificate_expiry_seconds`` counts down to the served one's ``notAfter``.

Token file at a reload: an empty list (no token lines) is valid and revokes every token. A
file that is missing or unreadable keeps the last list for ``TOKEN_FILE_GRACE_S`` seconds --
a Kubernetes Secret volume swaps its files with an atomic rename of a symlink, so a correct
update never shows a missing file for longer than that -- and then fails closed: every call
but health is refused until the file is back.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import ssl
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from gramstyle.errors import FieldError

log = logging.getLogger(__name__)

#: What a rejected call is told (clients and tests match on it).
UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token"
#: Services answered without a token: probes must work.
HEALTH_PREFIX = "/grpc.health.v1.Health/"
#: Services answered without a token only with ``public_reflection``.
REFLECTION_PREFIX = "/grpc.reflection."
SERVER_INFO_METHOD = "/gramstyle.v1.StyleTransferService/GetServerInfo"
#: How often (s) at most the files are checked for changes on disk; a check is one stat()
#: per file, made at a TLS handshake or a call.
CHANGE_CHECK_INTERVAL_S = 1.0
#: How long (s) a token file may be missing or unreadable before every token is revoked.
TOKEN_FILE_GRACE_S = 5.0

_PEM_MARKERS = {"certificate": b"-----BEGIN CERTIFICATE-----",
                "private key": b"PRIVATE KEY-----"}


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ValueError("the private key is encrypted; give an unencrypted PEM key")


def _read(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FieldError(field, f"cannot read {str(path)!r}: {exc.strerror or exc}") from None


def _read_pem(path: Path, field: str, what: str) -> bytes:
    data = _read(path, field)
    if _PEM_MARKERS[what] not in data:
        raise FieldError(field, f"{str(path)!r} is not a PEM {what} (no "
                         f"'-----BEGIN ...{what.upper()}-----' line)")
    return data


def _signature(paths: tuple[Path, ...]) -> tuple:
    """What changes when any of the files is replaced or rewritten (None where missing)."""
    result = []
    for path in paths:
        try:
            st = path.stat()  # follows symlinks: a Secret volume swaps ..data underneath
        except OSError:
            result.append(None)
        else:
            result.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(result)


class _Watched:
    """Files re-read on :meth:`reload` or, checked at most every
    ``CHANGE_CHECK_INTERVAL_S``, when their stat signature changes."""

    def __init__(self, paths: tuple[Path, ...]):
        self._paths = paths
        self._lock = threading.Lock()
        self._seen = _signature(paths)
        self._checked = time.monotonic()

    def _mark_seen(self) -> None:
        """Called when the files are (re)loaded: a change from here on is a new one."""
        self._seen = _signature(self._paths)

    def changed_on_disk(self) -> bool:
        """True (once) when the files changed since they were last loaded or looked at."""
        now = time.monotonic()
        if now - self._checked < CHANGE_CHECK_INTERVAL_S:
            return False
        self._checked = now
        current = _signature(self._paths)
        if current == self._seen:
            return False
        self._seen = current
        return True


# ---------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class _Pem:
    cert: bytes
    key: bytes
    client_ca: bytes | None
    #: The leaf certificate's notAfter, seconds since the epoch.
    not_after: float = 0.0


class CertificateRefused(FieldError):
    """A certificate or key file that fails its checks: ``field`` the setting
    (``tls_cert``, ``tls_key``, ``tls_client_ca``), ``reason`` the metric label
    (``unreadable``, ``invalid``, ``expired``, ``not_yet_valid``, ``key_mismatch``)."""

    def __init__(self, field: str, problem: str, reason: str):
        super().__init__(field, problem)
        self.reason = reason

    @classmethod
    def unreadable(cls, error: FieldError) -> CertificateRefused:
        return cls(error.field, error.problem, "unreadable")


def _validity(cert: bytes, path: Path, now: float | None = None) -> float:
    """The leaf certificate's notAfter (epoch seconds); raises CertificateRefused when it
    has expired or is not valid yet."""
    from cryptography import x509  # the server extra's; imported where certificates are

    try:
        leaf = x509.load_pem_x509_certificates(cert)[0]
    except ValueError as exc:
        raise CertificateRefused("tls_cert", f"{str(path)!r} holds no valid PEM certificate "
                                 f"({exc})", "invalid") from None
    now = time.time() if now is None else now
    before = leaf.not_valid_before_utc.timestamp()
    after = leaf.not_valid_after_utc.timestamp()
    if now < before:
        raise CertificateRefused(
            "tls_cert", f"{str(path)!r} is not valid yet (from "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC)", "not_yet_valid")
    if now > after:
        raise CertificateRefused(
            "tls_cert", f"{str(path)!r} expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} "
            f"UTC", "expired")
    return after


class TlsFiles(_Watched):
    """The server certificate chain and key (and the client CA for mutual TLS), as PEM files.

    Args:
        cert: the certificate chain, leaf first (PEM).
        key: its unencrypted private key (PEM).
        client_ca: when given, clients must present a certificate signed by one of the CAs in
            this PEM file (mutual TLS).

    Raises ValueError naming the option and the file when one cannot be read, is not PEM,
    or the key does not belong to the certificate.
    """

    def __init__(self, cert: str | os.PathLike[str], key: str | os.PathLike[str],
                 client_ca: str | os.PathLike[str] | None = None):
        self.cert, self.key = Path(cert), Path(key)
        self.client_ca = None if client_ca is None else Path(client_ca)
        super().__init__(tuple(p for p in (self.cert, self.key, self.client_ca) if p))
        self._pem = self._load()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        #: Refused reloads by reason (expired, not_yet_valid, key_mismatch, invalid,
        #: unreadable), for the metrics.
        self.reload_failures: Counter[str] = Counter()

    @property
    def not_after(self) -> float:
        """The served leaf certificate's notAfter (epoch seconds)."""
        return self._pem.not_after

    @property
    def pem(self) -> _Pem:
        """The files in use (replaced, as a new object, when a reload takes new ones): what
        the HTTP front watches to rebuild its own TLS context."""
        return self._pem

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate."""
        return self.client_ca is not None

    def _load(self) -> _Pem:
        try:
            cert = _read_pem(self.cert, "tls_cert", "certificate")
            key = _read_pem(self.key, "tls_key", "private key")
        except FieldError as exc:
            raise CertificateRefused.unreadable(exc) from None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:  # the chain alone first, so that an error names the right file
            context.load_verify_locations(cadata=cert.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise CertificateRefused("tls_cert", f"{str(self.cert)!r} holds no valid PEM "
                                     f"certificate ({exc})", "invalid") from None
        not_after = _validity(cert, self.cert)
        try:
            context.load_cert_chain(self.cert, self.key, password=_no_password)
        except OSError as exc:
            mismatch = "KEY_VALUES_MISMATCH" in str(exc)
            reason = ("it is not the private key of the certificate in "
                      f"{str(self.cert)!r}" if mismatch else "it is not a valid PEM private key")
            raise CertificateRefused("tls_key", f"{str(self.key)!r}: {reason} ({exc})",
                                     "key_mismatch" if mismatch else "invalid") from None
        except ValueError as exc:  # _no_password
            raise CertificateRefused("tls_key", f"{str(self.key)!r}: {exc}", "invalid") from None
        ca = None
        if self.client_ca is not None:
            try:
                ca = _read_pem(self.client_ca, "tls_client_ca", "certificate")
            except FieldError as exc:
                raise CertificateRefused.unreadable(exc) from None
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(
                    cadata=ca.decode("ascii", "replace"))
            except (ssl.SSLError, ValueError) as exc:
                raise CertificateRefused("tls_client_ca", f"{str(self.client_ca)!r} holds no "
                                         f"valid PEM certificate ({exc})", "invalid") from None
        return _Pem(cert, key, ca, not_after)

    def _configuration(self, pem: _Pem) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(pem.key, pem.cert)],
                                                         root_certificates=pem.client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that follow :meth:`reload` and changes on disk."""
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(self._pem), self._fetch,
            require_client_authentication=self.mutual)

    def reload(self) -> bool:
        """Re-read the files; from the next handshake on they are served. On a problem the
        previous ones stay and it is logged. Returns whether the new files were taken."""
        with self._lock:
            self._mark_seen()
            try:
                pem = self._load()
            except CertificateRefused as exc:
                self.reload_failures[exc.reason] += 1
                log.error("TLS files not reloaded (%s), the previous ones stay in use: %s",
                          exc.reason, exc)
                return False
            changed = pem != self._pem
            self._pem = pem
            self._pending = self._configuration(pem)
        log.info("TLS certificate reloaded from %s%s", self.cert,
                 "" if changed else " (unchanged)")
        return True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate-configuration fetcher, called at each new handshake: a new
        configuration, or None to keep the current one. Never raises."""
        try:
            if self.changed_on_disk():
                self.reload()
            with self._lock:
                pending, self._pending = self._pending, None
            return pending
        except Exception:  # noqa: BLE001 -- a fetcher error would fail the handshake
            log.exception("TLS certificate fetcher")
            return None


# ---------------------------------------------------------------------------- tokens


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class TokenStore(_Watched):
    """The accepted bearer tokens, read from ``path``: one per line; blank lines and lines
    starting with ``#`` are skipped; a token is printable ASCII without spaces.

    Raises ValueError (``auth_tokens: ...``, naming the file and a line number, never a
    token) when the file cannot be read, holds a malformed line or no token. At a reload an
    empty list is valid (it revokes every token), and a missing or unreadable file keeps the
    last list for ``grace_s`` seconds, then revokes every token until it is back.
    """

    def __init__(self, path: str | os.PathLike[str], grace_s: float = TOKEN_FILE_GRACE_S):
        self.path = Path(path)
        self.grace_s = grace_s
        super().__init__((self.path,))
        self._digests = self._load(allow_empty=False)
        #: When the file was first found missing or unreadable (monotonic s), else None.
        self._missing_since: float | None = None

    def __len__(self) -> int:
        return len(self._digests)

    def _load(self, allow_empty: bool = True) -> tuple[bytes, ...]:
        text = _read(self.path, "auth_tokens")
        digests = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith(b"#"):
                continue
            if not line.isascii() or not all(33 <= c < 127 for c in line):
                raise FieldError("auth_tokens", f"{str(self.path)!r} line {number}: a token must "
                                 f"be printable ASCII without spaces (the line is not shown)")
            digests.append(_digest(line))
        if not digests and not allow_empty:
            raise FieldError("auth_tokens", f"{str(self.path)!r} holds no token (one per line; "
                             f"'#' starts a comment)")
        return tuple(dict.fromkeys(digests))

    def reload(self) -> bool:
        """Re-read the file. An empty list is taken (it revokes every token). A malformed
        file keeps the previous tokens; a missing or unreadable one keeps them for
        ``grace_s`` seconds (see :meth:`_expire`). Logs what happened; returns whether a new
        list was taken."""
        with self._lock:
            self._mark_seen()
            try:
                self.path.stat()
                digests = self._load()
            except OSError as exc:  # stat: missing
                return self._unreadable(f"auth_tokens: {str(self.path)!r}: "
                                        f"{exc.strerror or exc}")
            except ValueError as exc:
                if "cannot read" in str(exc):
                    return self._unreadable(str(exc))
                log.error("tokens not reloaded, the previous ones stay in use: %s", exc)
                return False
            self._digests = digests
            self._missing_since = None
        if digests:
            log.info("%d bearer token(s) loaded from %s", len(digests), self.path)
        else:
            log.warning("no bearer token in %s: every call but health is refused", self.path)
        return True

    def _unreadable(self, problem: str) -> bool:
        """The file is missing or unreadable (call with the lock held)."""
        if self._missing_since is None:
            self._missing_since = time.monotonic()
            log.error("%s; the previous tokens stay in use for %g s, then every call is "
                      "refused until the file is back", problem, self.grace_s)
        return False

    def _expire(self) -> None:
        """Fail closed once the file has been missing or unreadable for ``grace_s``; before
        that, try it again every check interval (a Secret's swap puts it back)."""
        since = self._missing_since
        if since is None:
            return
        if time.monotonic() - since < self.grace_s:
            if self.changed_on_disk():
                self.reload()
            return
        with self._lock:
            if self._digests:
                self._digests = ()
                log.error("auth_tokens: %s has been missing or unreadable for %g s: every "
                          "token is revoked until it is back", self.path, self.grace_s)
        if self.changed_on_disk():
            self.reload()

    def accepts(self, authorization: str | bytes | None) -> bool:
        """Whether an ``authorization`` metadata value is ``Bearer <an accepted token>``
        (the scheme in any case). Constant time in which token matched."""
        if self._missing_since is not None:
            self._expire()
        elif self.changed_on_disk():
            self.reload()
        if isinstance(authorization, str):
            authorization = authorization.encode("utf-8", "replace")
        if not authorization:
            return False
        scheme, _, token = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        presented = _digest(token.strip())
        matched = False
        for digest in self._digests:  # no early exit
            matched |= hmac.compare_digest(presented, digest)
        return matched


def _authorization(metadata: Any) -> str | bytes | None:
    values = [value for key, value in metadata or () if key == "authorization"]
    return values[0] if len(values) == 1 else None  # two headers: ambiguous, refuse


async def _refuse(context: Any) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


def _abort_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` answering UNAUTHENTICATED without reading the request: every kind becomes
    *request-streaming* (grpc.aio then reads no message until asked, and this never asks),
    so a refused caller's message -- up to the receive limit -- is never received or parsed;
    the response side keeps its kind, so that streaming methods answer as streams."""

    async def unary(requests: Any, context: Any) -> Any:
        await _refuse(context)

    async def stream(requests: Any, context: Any) -> Any:
        await _refuse(context)
        yield  # pragma: no cover -- makes this an async generator, as the kind expects

    streaming = handler.response_streaming
    return handler._replace(request_streaming=True, unary_unary=None, unary_stream=None,
                            stream_unary=None if streaming else unary,
                            stream_stream=stream if streaming else None)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` from :class:`TokenStore` on every call but
    health (and reflection and GetServerInfo with ``public_reflection``). Put it after the
    request-log interceptor, so that refused calls are logged and counted too."""

    def __init__(self, tokens: TokenStore, public_reflection: bool = False):
        self.tokens = tokens
        self.public_reflection = public_reflection

    def is_public(self, method: str) -> bool:
        """Whether ``method`` (``/package.Service/Method``) answers without a token."""
        if method.startswith(HEALTH_PREFIX):
            return True
        return self.public_reflection and (method.startswith(REFLECTION_PREFIX)
                                           or method == SERVER_INFO_METHOD)

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler | None]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        method = method.decode() if isinstance(method, bytes) else method
        if handler is None or self.is_public(method):
            return handler
        if self.tokens.accepts(_authorization(handler_call_details.invocation_metadata)):
            return handler
        return _abort_handler(handler)


# ---------------------------------------------------------------------------- plaintext


def is_loopback_host(host: str) -> bool:
    """Whether ``--host`` listens on this machine only (localhost, 127.0.0.0/8, ::1)."""
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plaintext_tokens(host: str, tls: bool, tokens: bool, insecure_auth: bool) -> None:
    """Refuse bearer tokens over plaintext on an address other than loopback, where they
    would cross the network readable (ValueError naming --auth-tokens); with
    ``insecure_auth`` warn instead (a service mesh that encrypts between pods)."""
    if not tokens or tls or is_loopback_host(host):
        return
    if not insecure_auth:
        raise FieldError(
            "auth_tokens", f"tokens would travel in plaintext to {host}, which is not only this "
            f"machine; give --tls-cert and --tls-key, listen on 127.0.0.1, or pass "
            f"--insecure-auth when something else encrypts the traffic (a service mesh)")
    log.warning("--insecure-auth: bearer tokens travel in plaintext to %s; anyone on the path "
                "can read and replay them", host)


__all__ = ["UNAUTHENTICATED_MESSAGE", "AuthInterceptor", "TlsFiles", "TokenStore",
           "check_plaintext_tokens", "is_loopback_host"]
