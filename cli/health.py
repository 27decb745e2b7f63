"""``gramstyle health``: ask a server's standard ``grpc.health.v1`` health service whether it
is SERVING. The container image's HEALTHCHECK runs it; it is also handy on its own.

Exit status: 0 SERVING; 1 anything else (NOT_SERVING while draining, an unknown service,
unreachable, the deadline passed) -- what Docker's HEALTHCHECK and exec probes expect; 2 a
mistake in the flags.
"""

from __future__ import annotations

import argparse
import sys

from gramstyle.cli.flags import (
    EXIT_FAILURE,
    EXIT_OK,
    CLIError,
    add_remote_flags,
    connect,
)


def add_parser(sub) -> None:
    p = sub.add_parser("health", help="check a server's gRPC health service (exit 0: SERVING)",
                       description="Call grpc.health.v1.Health/Check on --server and print "
                                   "the status. Exit 0 when SERVING, 1 otherwise. Here "
                                   "--timeout defaults to 5 s and --retries to 0: a probe "
                                   "reports the state now.")
    p.add_argument("--service", default="", metavar="NAME",
                   help="the service to ask about (default: '', the whole server; or "
                        "gramstyle.v1.StyleTransferService)")
    add_remote_flags(p)
    # A probe reports the state now: no repeats, and a short deadline unless one is given.
    p.set_defaults(func=run, retries=0)


def run(args: argparse.Namespace) -> int:
    if not args.server:
        raise CLIError("--server: give the server to check, e.g. --server localhost:50051")
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError as exc:
        raise CLIError(f"health needs grpcio-health-checking (pip install "
                       f"grpcio-health-checking, or the server extra): {exc}",
                       EXIT_FAILURE) from None
    import grpc

    timeout = 5.0 if args.timeout is None else args.timeout
    with connect(args) as client:
        stub = health_pb2_grpc.HealthStub(client.channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=args.service),
                                  timeout=timeout, metadata=client.metadata)
        except grpc.RpcError as exc:
            print(f"gramstyle: health of {client.target}: {exc.code().name}: {exc.details()}",
                  file=sys.stderr)
            return EXIT_FAILURE
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return EXIT_OK if response.status == health_pb2.HealthCheckResponse.SERVING \
        else EXIT_FAILURE
