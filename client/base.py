"""What the sync and async clients share: channel set-up (targets, TLS, the token), request
building, retries, reading the answers, errors. Only the calls themselves differ (blocking vs
awaited), in :mod:`gramstyle.client.client` and :mod:`gramstyle.client.aio`."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import grpc

from gramstyle import codec
from gramstyle.client.channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PemSource,
    bearer_metadata,
    is_loopback,
    normalize_target,
    tls_credentials,
)
from gramstyle.client.channel import channel_options as make_channel_options
from gramstyle.client.errors import ServiceError
from gramstyle.errors import FieldError, warn_field
from gramstyle.results import Progress, StylizeResult
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

log = logging.getLogger("gramstyle.client")

#: Sentinel: use the client's default timeout.
DEFAULT: Any = object()

#: The deadline of each call, in seconds, when neither the client nor the call sets
#: ``timeout``: long enough for a CPU run at the default options while waiting behind a full
#: queue, so that a hung server or a lost network never holds the caller forever.
#: Stylize: 30 min -- a 512 px run takes 1 to 6 min on a 2-core CPU (docs/benchmarks.md),
#: and the call may wait for the runs ahead of it (``--queue-size`` 4). ComputeLosses: 10 min
#: -- seconds of work, but it queues behind Stylize runs on the same workers. GetServerInfo:
#: 30 s -- it never queues. All attempts of a call (``retries``) share its deadline.
DEFAULT_TIMEOUTS: dict[str, float] = {"Stylize": 1800.0, "ComputeLosses": 600.0,
                                      "GetServerInfo": 30.0}


def check_timeout(timeout: Any, field: str = "timeout") -> None:
    """A deadline is a positive, finite number of seconds, None (no deadline) or DEFAULT."""
    if timeout is None or timeout is DEFAULT:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not 0 < timeout < float("inf"):
        raise FieldError(field, f"must be a positive number of seconds, or None for no "
                         f"deadline, got {timeout!r}", timeout)

#: The most ``retries`` a client accepts: more only hides an outage for longer.
MAX_RETRIES = 10


class Attempts:
    """The attempts of one call: starts it, and decides after each failure whether (and after
    how long) to start it again.

    A call is repeated from the start when it fails with UNAVAILABLE (its server died,
    restarted, drained or could not be reached) and the budget of ``retries`` repeats is not
    spent. Every gramstyle call is safe to repeat: Stylize with its seed is deterministic,
    ComputeLosses and GetServerInfo only read. With round_robin the repeat goes to another
    replica when there is one. The wait before repeat n is drawn from [b/2, b] with
    b = 0.2 s * 2**(n-1), at most 3 s; the call's deadline covers all attempts together, so
    no repeat starts that could not finish in time.
    """

    INITIAL_BACKOFF_S = 0.2
    MAX_BACKOFF_S = 3.0

    def __init__(self, start: Callable[[float | None], Any], retries: int,
                 timeout: float | None, rpc: str):
        self._start = start
        self.retries = retries
        self.rpc = rpc
        #: 1 for the first try, 2 for the first repeat, ...
        self.attempt = 1
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left until the call's deadline (None: no deadline)."""
        if self._deadline is None:
            return None
        return max(self._deadline - time.monotonic(), 0.0)

    def start(self) -> Any:
        """Start one attempt (a sync or aio call object) with the time left as its deadline."""
        return self._start(self.remaining())

    def after_failure(self, exc: grpc.RpcError) -> float:
        """Seconds to wait before the next attempt; raises the :class:`ServiceError` when the
        call must fail (not UNAVAILABLE, budget spent, or no time left)."""
        error = ServiceError.from_rpc_error(exc, attempts=self.attempt)
        if error.code != grpc.StatusCode.UNAVAILABLE or self.attempt > self.retries:
            raise error from None
        ceiling = min(self.MAX_BACKOFF_S, self.INITIAL_BACKOFF_S * 2 ** (self.attempt - 1))
        delay = random.uniform(ceiling / 2, ceiling)
        remaining = self.remaining()
        if remaining is not None and remaining <= delay:
            raise error from None
        self.attempt += 1
        log.info("%s failed with UNAVAILABLE (%s); starting attempt %d of %d in %.2f s",
                 self.rpc, error.message, self.attempt, self.retries + 1, delay)
        return delay


class ClientBase:
    """A connection to one or several gramstyle servers (shared by Client and AsyncClient).

    Args:
        target: ``"host:port"``, a gRPC target URI (``"dns:///svc:50051"``), or several
            addresses (a list or comma-separated) balanced round_robin; see
            :mod:`gramstyle.client.channel`.
        timeout: deadline of each call in seconds, all its attempts together; unset: a
            deadline per RPC that fits a CPU run (:data:`DEFAULT_TIMEOUTS`: Stylize 1800,
            ComputeLosses 600, GetServerInfo 30); None: no deadline. A call's own
            ``timeout=`` overrides it.
        retries: how many times a call that fails with UNAVAILABLE is repeated from the
            start, on another replica when there is one (default 2, 0 = never, at most 10).
            This covers a server that dies in the middle of a Stylize stream: the stream
            starts again from iteration 0 and its :class:`Progress` messages carry
            ``attempt`` = 2, 3, ... (see :class:`Attempts` for the backoff).
        tls: encrypt with TLS, trusting the system's root certificates.
        tls_ca: trust this CA instead (a PEM file path, or PEM bytes); implies TLS.
        tls_cert, tls_key: a client certificate and its key for mutual TLS (paths or PEM
            bytes; both or neither); imply TLS.
        tls_server_name: check the server's certificate against this name instead of the
            target's host (e.g. when dialing pod IPs).
        token: sent as ``authorization: Bearer <token>`` with every call. Without TLS, to an
            address that is not this machine, a warning says the token travels in plaintext.
        max_message_bytes: send/receive size limit (the server has its own; keep them equal).
        credentials: ready-made ``grpc.ChannelCredentials`` (instead of the tls arguments).
        channel_options: extra gRPC channel arguments.
        metadata: extra metadata sent with each call (e.g. ``[("x-request-id", "...")]``).

    Bad arguments (an unreadable or non-PEM certificate file, a cert without its key, a
    token with spaces) raise ``ValueError`` naming the argument, before anything connects.
    """

    #: grpc or grpc.aio: where the channel constructors come from.
    _grpc: Any = grpc

    def __init__(self, target: str | Sequence[str], *, timeout: float | None = DEFAULT,
                 retries: int = 2, tls: bool = False, tls_ca: PemSource | None = None,
                 tls_cert: PemSource | None = None, tls_key: PemSource | None = None,
                 tls_server_name: str | None = None, token: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 credentials: grpc.ChannelCredentials | None = None,
                 channel_options: Sequence[tuple[str, Any]] = (),
                 metadata: Sequence[tuple[str, str]] = ()):
        if isinstance(retries, bool) or not isinstance(retries, int) \
                or not 0 <= retries <= MAX_RETRIES:
            raise FieldError("retries", f"must be an integer between 0 and {MAX_RETRIES}, "
                             f"got {retries!r}", retries)
        check_timeout(timeout)
        self.target = normalize_target(target)
        #: The deadline of every call in seconds; None: none; DEFAULT: DEFAULT_TIMEOUTS.
        self.timeout = timeout
        self.retries = retries
        from_tls = tls_credentials(tls, tls_ca, tls_cert, tls_key)
        if credentials is not None and from_tls is not None:
            raise FieldError("credentials", "give either credentials= or tls/tls_ca/tls_cert/"
                             "tls_key, not both")
        credentials = credentials or from_tls
        #: True when the channel is encrypted.
        self.tls = credentials is not None
        extra = []
        if token is not None:
            extra.append(bearer_metadata(token))
            if not self.tls and not is_loopback(self.target):
                warn_field("token", f"sent in plaintext to {self.target}, which is not this "
                           "machine; use tls=True (or tls_ca=) unless a service mesh "
                           "encrypts the connection", stacklevel=2)
        self.metadata = (*metadata, *extra)
        opts = [*make_channel_options(max_message_bytes, tls_server_name), *channel_options]
        self.channel = (self._grpc.secure_channel(self.target, credentials, opts) if credentials
                        else self._grpc.insecure_channel(self.target, opts))
        self.stub = pb_grpc.StyleTransferServiceStub(self.channel)

    def _attempts(self, method: Callable[..., Any], request: Any, timeout: Any,
                  rpc: str) -> Attempts:
        """The attempts of one call of ``method`` (a stub method) with ``request``."""
        def start(remaining: float | None) -> Any:
            return method(request, timeout=remaining, metadata=self.metadata)

        return Attempts(start, self.retries, self.deadline(rpc, timeout), rpc)

    def deadline(self, rpc: str, timeout: Any = DEFAULT) -> float | None:
        """The deadline in seconds of a call of ``rpc`` ('Stylize', 'ComputeLosses',
        'GetServerInfo') given the call's ``timeout``: its own, else the client's, else
        :data:`DEFAULT_TIMEOUTS`; None means no deadline."""
        check_timeout(timeout)
        for choice in (timeout, self.timeout):
            if choice is not DEFAULT:
                return choice
        return DEFAULT_TIMEOUTS[rpc]

    def _stylize(self, content: Any, style: Any, options: Any, timeout: Any,
                 kwargs: dict) -> Attempts:
        # The request is built (and its images read) once, for every attempt.
        request = codec.stylize_request(content, style, options=options, **kwargs)
        return self._attempts(self.stub.Stylize, request, timeout, "Stylize")

    def _compute_losses(self, candidate: Any, content: Any, style: Any, options: Any,
                        timeout: Any, kwargs: dict) -> Attempts:
        request = codec.losses_request(candidate, content, style, options=options, **kwargs)
        return self._attempts(self.stub.ComputeLosses, request, timeout, "ComputeLosses")

    def _server_info(self, timeout: Any) -> Attempts:
        return self._attempts(self.stub.GetServerInfo, pb.GetServerInfoRequest(), timeout,
                              "GetServerInfo")


class StreamBase:
    """A running Stylize call: progress messages as they come, then :attr:`result`.

    When the server fails mid-stream with UNAVAILABLE, the call starts again from the
    beginning (within the client's ``retries``); :attr:`attempt` counts the tries and every
    :class:`Progress` carries it.

    A large result image arrives in ResultChunk messages before the Result; they are
    reassembled here (:class:`gramstyle.codec.ResultAssembly`), and a broken chunk stream
    fails the call with DATA_LOSS. A restarted attempt drops the chunks of the one before.
    """

    def __init__(self, attempts: Attempts):
        self._attempts = attempts
        self._cancelled = False
        self._call = attempts.start()
        self._assembly = codec.ResultAssembly()
        self.result: StylizeResult | None = None

    @property
    def attempt(self) -> int:
        """1 for the first try; 2, 3, ... after the call restarted."""
        return self._attempts.attempt

    def _accept(self, message: pb.StylizeResponse) -> Progress | None:
        """A progress message, or None after taking a result chunk or storing the result.
        Raises ServiceError(DATA_LOSS) (and cancels the call) on a broken chunk stream."""
        kind = message.WhichOneof("kind")
        if kind == "progress":
            progress = codec.progress_from(message.progress)
            progress.attempt = self._attempts.attempt
            return progress
        try:
            if kind == "result_chunk":
                self._assembly.add(message.result_chunk)
            elif kind == "result":
                self.result = codec.result_from(self._assembly.complete(message.result))
            else:
                raise FieldError("kind", f"a Stylize stream message of unknown kind "
                                 f"{kind!r} (a newer server?)")
        except ValueError as exc:
            self._call.cancel()
            raise ServiceError(grpc.StatusCode.DATA_LOSS, str(exc)) from None
        return None

    def _restart(self) -> None:
        """Start the next attempt (after the backoff), without the last one's chunks."""
        if self._cancelled:
            self._raise_cancelled()
        self._assembly = codec.ResultAssembly()
        self._call = self._attempts.start()

    @staticmethod
    def _raise_cancelled() -> NoReturn:
        raise ServiceError(grpc.StatusCode.CANCELLED, "cancelled by the caller")

    def _finished(self) -> None:
        if self.result is None:
            raise ServiceError(grpc.StatusCode.INTERNAL,
                               "the server ended the stream without a result")

    def cancel(self) -> None:
        """Stop the call; the server stops the optimisation within one iteration."""
        self._cancelled = True
        self._call.cancel()
