"""``gramstyle serve``: load the model once and serve gramstyle.v1.StyleTransferService."""

from __future__ import annotations

import argparse

from gramstyle.client.cli.flags import (
    EXIT_FAILURE,
    CLIError,
    add_model_flags,
    finite_float,
    model_option,
)
from gramstyle.images import DEFAULT_MAX_PIXELS
from gramstyle.options import MAX_ITERATIONS, MAX_SIZE


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC server (gramstyle.v1.StyleTransferService)",
                       description="Load the model once and serve Stylize, ComputeLosses and "
                                   "GetServerInfo, plus grpc.health.v1 and reflection. Prints "
                                   "one 'ready' line; SIGTERM drains and exits 0.")
    add_model_flags(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="[::]", help="address to listen on (default: all, "
                   "IPv4 and IPv6; 127.0.0.1 for this machine only)")
    g.add_argument("--port", type=int, default=50051,
                   help="port (default 50051; 0 picks a free one and prints it)")
    g.add_argument("--workers", type=int, default=1,
                   help="optimisations run at once (default 1; on CPU one run already uses "
                        "every core)")
    g.add_argument("--queue-size", type=int, default=4,
                   help="requests that may wait for a worker; beyond that the server answers "
                        "RESOURCE_EXHAUSTED at once (default 4)")
    g.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="largest width*height of any input image, checked from the header "
                        f"before decoding (default {DEFAULT_MAX_PIXELS})")
    g.add_argument("--max-size", type=int, default=MAX_SIZE,
                   help=f"largest output long side in pixels (default and most {MAX_SIZE})")
    g.add_argument("--max-iterations", type=int, default=MAX_ITERATIONS,
                   help=f"most iterations per request (default {MAX_ITERATIONS})")
    g.add_argument("--max-message-mb", type=int, default=64,
                   help="gRPC send/receive message limit in MiB (default 64: a 2048 px PNG "
                        "each way, several input images, or a 2048 px gradient)")
    g.add_argument("--grace", type=finite_float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long in-flight calls may take to finish (default 30)")
    g.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics")
    g.add_argument("--log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the flags, then load the model and serve until SIGTERM."""
    try:
        from gramstyle.server.serve import ServeConfig, configure_logging
        from gramstyle.server.serve import run as serve
    except ImportError as exc:
        raise CLIError(f"serve needs the server extra (pip install 'gramstyle[server]'): {exc}",
                       EXIT_FAILURE) from exc
    for flag, value, low in (("--port", args.port, 0), ("--workers", args.workers, 1),
                             ("--queue-size", args.queue_size, 0),
                             ("--max-pixels", args.max_pixels, 1),
                             ("--max-size", args.max_size, 16),
                             ("--max-iterations", args.max_iterations, 1),
                             ("--max-message-mb", args.max_message_mb, 1)):
        if value < low:
            raise CLIError(f"{flag}: must be >= {low}, got {value}")
    if args.port > 65535:
        raise CLIError(f"--port: must be <= 65535, got {args.port}")
    configure_logging(args.log_level)
    config = ServeConfig(
        host=args.host, port=args.port, arch=model_option(args, "arch"),
        weights=(model_option(args, "weights"),), pooling=model_option(args, "pooling"),
        device=model_option(args, "device"), max_pixels=args.max_pixels,
        max_size=min(args.max_size, MAX_SIZE), max_iterations=args.max_iterations,
        max_message_bytes=args.max_message_mb * 2**20, workers=args.workers,
        queue_size=args.queue_size, grace_s=args.grace, metrics_port=args.metrics_port)
    try:
        return serve(config)
    except OSError as exc:  # port in use
        raise CLIError(f"--port: {exc}", EXIT_FAILURE) from None
