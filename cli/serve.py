"""``gramstyle serve``: load the model once and serve gramstyle.v1.StyleTransferService."""

from __future__ import annotations

import argparse
import re

from gramstyle.cli.envflags import add_env_variables, apply_env
from gramstyle.cli.flags import (
    EXIT_FAILURE,
    SERVER_EXTRA_INSTALL,
    CLIError,
    add_model_flags,
    finite_float,
    model_option,
)
from gramstyle.images import DEFAULT_MAX_PIXELS
from gramstyle.options import MAX_ITERATIONS, MAX_SIZE

_UNITS = {"": 2**20, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def memory_size(text: str) -> int:
    """A memory size in bytes from '512M', '8G', '1.5GiB', '2048' (MiB when no unit)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 512M, 8G or 1.5GiB (MiB without a unit), got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


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
    g.add_argument("--target-cache-mb", type=int, default=256, metavar="MIB",
                   help="memory for the content features and style Gram targets kept across "
                        "requests, so that repeated targets (ComputeLosses against the same "
                        "images, one style for many images) skip their network passes; LRU, "
                        "0 turns it off (default 256)")
    g.add_argument("--max-images", type=int, default=8, metavar="N",
                   help="images per request: content, style, init image and candidate "
                        "together, checked before any is decoded (default 8)")
    g.add_argument("--max-request-memory", type=memory_size, metavar="SIZE",
                   help="largest peak memory one request may need, estimated from the image "
                        "headers and options before decoding; a request over it gets "
                        "INVALID_ARGUMENT naming what to lower. E.g. 4G, 512M (default: the "
                        "memory budget)")
    g.add_argument("--memory-budget", type=memory_size, metavar="SIZE",
                   help="what the estimates of the requests running at once may add up to; "
                        "a request that would exceed it waits in the queue (default: 80%% of "
                        "the machine's or container's memory, less the loaded models and the "
                        "target cache; the ready line shows it)")
    g.add_argument("--max-concurrent-streams", type=int, default=100, metavar="N",
                   help="streams one client connection may have open at once; a client "
                        "queues the excess, the server refuses streams beyond it (default 100)")
    g.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics at http://METRICS_HOST:PORT/metrics")
    g.add_argument("--metrics-host", metavar="HOST",
                   help="address the metrics listen on (default: --host, or 127.0.0.1 when "
                        "--host is every interface)")
    g.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="any case (default INFO)")
    g.add_argument("--log-format", default="text", choices=("text", "json"),
                   help="text: one line per request of key=value fields; json: one JSON "
                        "object per line (default text)")
    g.add_argument("--health-port", type=int, metavar="PORT",
                   help="also serve grpc.health.v1, and only that, in plaintext on this port "
                        "(for Kubernetes gRPC probes, which cannot do TLS); it answers what "
                        "the main port would, NOT_SERVING while draining included")
    s = p.add_argument_group("security")
    s.add_argument("--tls-cert", metavar="FILE",
                   help="serve TLS with this PEM certificate chain (with --tls-key); SIGHUP "
                        "or a change of the file on disk loads a new one for new connections")
    s.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    s.add_argument("--tls-client-ca", metavar="FILE",
                   help="mutual TLS: require client certificates signed by a CA in this PEM "
                        "file")
    s.add_argument("--auth-tokens", metavar="FILE",
                   help="require 'authorization: Bearer <token>' for one of the tokens in "
                        "this file (one per line, '#' comments; reloaded on SIGHUP or when "
                        "it changes); health answers without one")
    s.add_argument("--public-reflection", action="store_true",
                   help="with --auth-tokens: let reflection and GetServerInfo answer without "
                        "a token")
    s.add_argument("--insecure-auth", action="store_true",
                   help="allow --auth-tokens without TLS on an address other than loopback "
                        "(tokens travel readable; for a mesh that encrypts), with a warning")
    add_env_variables(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the flags, then load the model and serve until SIGTERM."""
    apply_env(args)  # flags not given come from GRAMSTYLE_* variables
    try:
        from gramstyle.server.serve import ServeConfig, configure_logging
        from gramstyle.server.serve import run as serve
    except ImportError as exc:
        raise CLIError(f"serve needs the server extra ({SERVER_EXTRA_INSTALL}): {exc}",
                       EXIT_FAILURE) from exc
    for flag, value, low in (("--port", args.port, 0), ("--workers", args.workers, 1),
                             ("--queue-size", args.queue_size, 0),
                             ("--max-pixels", args.max_pixels, 1),
                             ("--max-size", args.max_size, 16),
                             ("--max-iterations", args.max_iterations, 1),
                             ("--max-message-mb", args.max_message_mb, 1),
                             ("--target-cache-mb", args.target_cache_mb, 0),
                             ("--max-images", args.max_images, 1),
                             ("--max-concurrent-streams", args.max_concurrent_streams, 1)):
        if value < low:
            raise CLIError(f"{flag}: must be >= {low}, got {value}")
    if args.port > 65535:
        raise CLIError(f"--port: must be <= 65535, got {args.port}")
    if args.health_port is not None and not 0 <= args.health_port <= 65535:
        raise CLIError(f"--health-port: must be 0 to 65535, got {args.health_port}")
    configure_logging(args.log_level, args.log_format)
    config = ServeConfig(
        host=args.host, port=args.port, arch=model_option(args, "arch"),
        weights=(model_option(args, "weights"),), pooling=model_option(args, "pooling"),
        device=model_option(args, "device"), max_pixels=args.max_pixels,
        max_size=min(args.max_size, MAX_SIZE), max_iterations=args.max_iterations,
        max_message_bytes=args.max_message_mb * 2**20, workers=args.workers,
        queue_size=args.queue_size, grace_s=args.grace, metrics_port=args.metrics_port,
        target_cache_mb=args.target_cache_mb, max_images=args.max_images,
        max_request_memory=args.max_request_memory, memory_budget=args.memory_budget,
        max_concurrent_streams=args.max_concurrent_streams, metrics_host=args.metrics_host,
        log_level=args.log_level, log_format=args.log_format, tls_cert=args.tls_cert,
        tls_key=args.tls_key, tls_client_ca=args.tls_client_ca, auth_tokens=args.auth_tokens,
        public_reflection=args.public_reflection, insecure_auth=args.insecure_auth,
        health_port=args.health_port)
    try:
        return serve(config)
    except OSError as exc:  # "port N is already in use", or the metrics port
        message = str(exc)
        raise CLIError(message if message.startswith("--") else f"--port: {message}",
                       EXIT_FAILURE) from None
