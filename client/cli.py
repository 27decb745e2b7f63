"""The ``gramstyle`` command line.

    gramstyle stylize --content cat.png --style starry.jpg -o out.png --size 512
    gramstyle info
    gramstyle losses candidate.png --content cat.png --style starry.jpg
    gramstyle serve --arch vgg16 --weights vgg16.pth --port 50051
    gramstyle stylize ... --server localhost:50051      (stylize/info/losses on a server)

Exit codes: 0 success, 2 a caller's mistake (bad option, bad image, bad weights file; for a
server: INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE, ...), 1 anything else. A server
error prints its status code name and message. Errors name the option and the bad value.
Nothing half-written is left at an output path: files are written atomically at the end.

This module must stay importable without torch (client-only install): the engine is
imported only when a command runs in-process.
"""

from __future__ import annotations

import argparse
import functools
import io
import math
import os
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from gramstyle import __version__
from gramstyle.client.errors import ServiceError
from gramstyle.images import (
    ImageError,
    check_output_path,
    format_for_path,
    load_image,
    save_image,
    write_bytes_atomic,
)
from gramstyle.server.options import (
    ARCHS,
    DEFAULT_CONTENT_LAYERS,
    DEFAULT_STYLE_LAYERS,
    DEVICES,
    INITS,
    MAX_ITERATIONS,
    MAX_SIZE,
    OPTIMIZERS,
    POOLINGS,
    PRECISIONS,
    StyleOptions,
)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

# StyleOptions/engine field names whose CLI flag is not simply --field-with-dashes.
_FLAG_FOR_FIELD = {
    "content_blend_weights": "--content-weights",
    "style_blend_weights": "--style-weights",
    "learning_rate": "--lr",
    "progress_sheet": "--progress-sheet",
}


class CLIError(Exception):
    """An error to print and exit with; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def flag_message(message: str) -> str:
    """Rewrite an API error "content_weight: ..." / "content[1]: ..." to name the CLI flag."""
    match = re.match(r"^([a-z_]+)(?:\[(\d+)\])?:", message)
    if not match:
        return message
    field, index = match.groups()
    flag = _FLAG_FOR_FIELD.get(field, "--" + field.replace("_", "-"))
    where = f"{flag} #{int(index) + 1}" if index is not None else flag
    return f"{where}:{message[match.end():]}"


# ---------------------------------------------------------------------------- parsing helpers

def _float_list(flag: str):
    def parse(text: str) -> tuple[float, ...]:
        values = []
        for part in text.split(","):
            try:
                value = float(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{part.strip()!r} is not a number") from None
            if math.isnan(value) or value < 0 or math.isinf(value):
                raise argparse.ArgumentTypeError(f"{part.strip()!r}: weights must be finite "
                                                 f"and >= 0")
            values.append(value)
        return tuple(values)
    parse.__name__ = f"{flag} list"
    return parse


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


#: Defaults of the network flags. They are filled in after parsing (the parser's default is
#: None) so that with --server only the flags actually given are sent: a server picks its own
#: default model, and --pooling/--device are the server's choice.
MODEL_DEFAULTS = {"arch": "vgg19", "weights": "imagenet", "pooling": "max", "device": "auto"}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--arch, --weights, --pooling, --device: which network runs (in-process or `serve`)."""
    group = parser.add_argument_group("network")
    group.add_argument("--arch", choices=ARCHS, help="feature extractor (default: vgg19; with "
                       "--server: the server's default model)")
    group.add_argument("--weights",
                       help="imagenet (torchvision download cache), random (seeded RandomNet) "
                            "or a path to a VGG / VGG-features state_dict (default: imagenet); "
                            "with --server: one of the weights the server loaded")
    group.add_argument("--pooling", choices=POOLINGS, help="max (default) or avg")
    group.add_argument("--device", choices=DEVICES, help="auto (default), cpu or cuda")


def model_option(args: argparse.Namespace, name: str) -> str:
    """The value of a network flag, or its default."""
    return getattr(args, name, None) or MODEL_DEFAULTS[name]


def add_remote_options(parser: argparse.ArgumentParser) -> None:
    """--server and --timeout: run the command on a gramstyle server instead of in-process."""
    group = parser.add_argument_group("remote")
    group.add_argument("--server", metavar="HOST:PORT",
                       help="run on this gramstyle server (several: comma-separated, balanced "
                            "round_robin; or a gRPC target such as dns:///host:port)")
    group.add_argument("--timeout", type=_finite_float, metavar="SECONDS",
                       help="deadline of the call with --server (default: none)")


def _connect(args: argparse.Namespace):
    """A Client for --server; --pooling/--device are refused (the server chose them)."""
    from gramstyle.client.client import Client

    for name in ("pooling", "device"):
        if getattr(args, name, None) is not None:
            raise CLIError(f"--{name}: is chosen when the server starts (gramstyle serve "
                           f"--{name}); it cannot be set with --server")
    try:
        return Client(args.server, timeout=args.timeout)
    except ValueError as exc:
        raise CLIError(f"--server: {exc}".replace("--server: server: ", "--server: ")) from None


def add_style_options(parser: argparse.ArgumentParser) -> None:
    """Every StyleOptions field as a flag, shared by `stylize` and `losses`."""
    d = StyleOptions()
    g = parser.add_argument_group("images")
    g.add_argument("--content", action="append", default=[], metavar="IMAGE",
                   help="content image (repeat for several targets)")
    g.add_argument("--content-weights", type=_float_list("--content-weights"),
                   metavar="W1,W2", help="blend weights of the content images (default: equal)")
    g.add_argument("--style", action="append", default=[], metavar="IMAGE",
                   help="style image (repeat to blend several styles)")
    g.add_argument("--style-weights", type=_float_list("--style-weights"), metavar="W1,W2",
                   help="blend weights of the style images (default: equal)")
    g = parser.add_argument_group("losses")
    g.add_argument("--content-layers", type=_name_list, default=d.content_layers,
                   metavar="L1,L2", help=f"default: {','.join(DEFAULT_CONTENT_LAYERS)}; names "
                   "(conv1_1, relu4_2, pool3, ...) or features indices (0, 2, 5, ...)")
    g.add_argument("--content-layer-weights", type=_float_list("--content-layer-weights"),
                   metavar="W1,W2")
    g.add_argument("--style-layers", type=_name_list, default=d.style_layers, metavar="L1,L2",
                   help=f"default: {','.join(DEFAULT_STYLE_LAYERS)}")
    g.add_argument("--style-layer-weights", type=_float_list("--style-layer-weights"),
                   metavar="W1,W2")
    g.add_argument("--content-weight", type=_finite_float, default=d.content_weight,
                   help=f"alpha (default {d.content_weight}); 0 = texture synthesis")
    g.add_argument("--style-weight", type=_finite_float, default=d.style_weight,
                   help=f"beta (default {d.style_weight}); 0 = feature inversion")
    g.add_argument("--tv-weight", type=_finite_float, default=d.tv_weight,
                   help=f"total-variation weight (default {d.tv_weight})")
    g.add_argument("--size", type=int, default=d.size, help="output long side in pixels "
                   f"(default {d.size})")
    g.add_argument("--style-scale", type=_finite_float, default=d.style_scale,
                   help="style images are resized to size*style-scale")
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision)


def add_optimiser_options(parser: argparse.ArgumentParser) -> None:
    d = StyleOptions()
    g = parser.add_argument_group("optimisation")
    g.add_argument("--init", choices=INITS, default=None,
                   help="start image: content, seeded noise, style, or image (--init-image). "
                        "Default: image with --init-image, else content if given, else noise")
    g.add_argument("--init-image", metavar="IMAGE", help="start image for --init image")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    g.add_argument("--iterations", type=int, default=d.iterations,
                   help=f"optimiser steps (per scale; default {d.iterations})")
    g.add_argument("--scales", type=int, default=d.scales,
                   help="coarse-to-fine: optimise at N sizes growing by sqrt(2) up to --size, "
                        "each from the previous result (default 1)")
    g.add_argument("--lr", type=_finite_float, default=None,
                   help="learning rate (default: 1.0 for lbfgs, 0.02 for adam)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--preserve-colors", action="store_true",
                   help="keep the content image's colours (luminance-only transfer)")
    g.add_argument("--progress-every", type=_positive_int, default=d.progress_every,
                   help="iterations between progress reports and sheet frames")


def style_options_from_args(args: argparse.Namespace) -> dict:
    """The StyleOptions fields given on the command line, as a plain dict (torch-free)."""
    return dict(
        content_layers=tuple(args.content_layers),
        content_layer_weights=args.content_layer_weights,
        style_layers=tuple(args.style_layers),
        style_layer_weights=args.style_layer_weights,
        content_blend_weights=args.content_weights,
        style_blend_weights=args.style_weights,
        content_weight=args.content_weight,
        style_weight=args.style_weight,
        tv_weight=args.tv_weight,
        init=getattr(args, "init", None),
        optimizer=getattr(args, "optimizer", "lbfgs"),
        iterations=getattr(args, "iterations", 1),
        learning_rate=getattr(args, "lr", None),
        seed=getattr(args, "seed", 0),
        size=args.size,
        style_scale=args.style_scale,
        preserve_colors=getattr(args, "preserve_colors", False),
        precision=args.precision,
        progress_every=getattr(args, "progress_every", 10),
        scales=getattr(args, "scales", 1),
    )


def check_image_files(args: argparse.Namespace) -> None:
    """Decode every --content/--style file once, so a bad one fails before a model loads or a
    server is called. The paths (not the decoded images) are passed on afterwards, so that a
    server receives the original bytes."""
    for field in ("content", "style"):
        for i, path in enumerate(getattr(args, field)):
            load_image(path, f"{field}[{i}]", max_pixels=None)


def frame_path(output: Path, iteration: int) -> Path:
    """Where --save-every writes the frame of ``iteration``: out.png -> out_0050.png."""
    return output.with_name(f"{output.stem}_{iteration:04d}{output.suffix}")


# ---------------------------------------------------------------------------- commands

def _load_engine(args: argparse.Namespace):
    if getattr(args, "timeout", None) is not None:
        raise CLIError("--timeout: is the deadline of a call to --server; it does not apply "
                       "in-process")
    try:
        from gramstyle.server.engine import StyleTransfer
    except ImportError as exc:
        raise CLIError(f"running in-process needs the server extra (pip install "
                       f"'gramstyle[server]'): {exc}; or pass --server HOST:PORT",
                       EXIT_FAILURE) from exc
    return StyleTransfer(arch=model_option(args, "arch"), weights=model_option(args, "weights"),
                         pooling=model_option(args, "pooling"),
                         device=model_option(args, "device"))


def cmd_stylize(args: argparse.Namespace) -> int:
    """Run style transfer in-process, with a tqdm bar, frames and a progress sheet."""
    from tqdm import tqdm

    output = check_output_path(args.output, "output")
    if args.progress_sheet:
        check_output_path(args.progress_sheet, "progress_sheet")
    if args.save_every is not None and args.save_every < 1:
        raise CLIError(f"--save-every: must be >= 1, got {args.save_every}")
    options = StyleOptions(**style_options_from_args(args)).validated()
    if not args.content and not args.style:
        raise CLIError("--content/--style: give at least one image")
    if args.save_every and args.save_every >= options.iterations * options.scales:
        print(f"gramstyle: warning: --save-every {args.save_every} is not below the "
              f"{options.iterations * options.scales} iterations; no frames will be written",
              file=sys.stderr)
    check_image_files(args)
    if args.init_image:
        load_image(args.init_image, "init_image", max_pixels=None)

    every = options.progress_every
    frames: list = []
    want_preview = bool(args.save_every or args.progress_sheet)
    if args.server:
        # A Client has the engine's stylize() signature and returns the same fields, so the
        # rest of this function is shared; the bar is fed by the progress stream.
        client = _connect(args)
        stylize = functools.partial(
            client.stylize, output_format=FORMATS_BY_PILLOW[format_for_path(output)],
            arch=args.arch or "", weights=args.weights or "")
        # Every progress message with a preview carries an encoded image, so ask for them
        # only as often as frames are wanted; without previews, messages are tiny.
        options.progress_every = (math.gcd(every, args.save_every or every) if want_preview
                                  else 1)
    else:
        stylize = _load_engine(args).stylize
        options.progress_every = 1  # the bar moves every iteration; frames are picked below

    total = options.iterations * options.scales
    with tqdm(total=total, unit="it", desc="stylize", disable=args.quiet) as bar:
        def on_progress(p) -> None:
            bar.update(p.iteration - bar.n)
            bar.set_postfix(total=f"{p.losses.total:.4g}", content=f"{p.losses.content:.3g}",
                            style=f"{p.losses.style:.3g}", refresh=False)
            if p.image is None:
                return
            if args.save_every and p.iteration and p.iteration % args.save_every == 0 \
                    and p.iteration < p.iterations:
                save_image(p.image, frame_path(output, p.iteration), "--save-every")
            if p.iteration % every == 0 or p.iteration == p.iterations:
                frames.append((p.iteration, p.image))

        result = stylize(args.content, args.style, options, init_image=args.init_image,
                         progress=on_progress, preview=want_preview)
    save_image(result.image, output, "output")
    if args.progress_sheet:
        from gramstyle.client.progress_sheet import save_progress_sheet

        label, source = ("content", args.content[0]) if args.content else ("style", args.style[0])
        save_progress_sheet(frames, args.progress_sheet, (label, load_image(source, label)))
    losses = result.losses
    print(f"wrote {output} ({result.image.width}x{result.image.height}) after "
          f"{result.iterations} iterations in {result.elapsed_s:.1f} s; total {losses.total:.4g} "
          f"(content {losses.content:.4g}, style {losses.style:.4g}, tv {losses.tv:.4g}); "
          f"kernel {result.backend} on {result.device}")
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, the device and the kernel backend of this install (or of --server)."""
    if args.server:
        from gramstyle.client.report import format_server_info

        with _connect(args) as client:
            print(format_server_info(client.server_info(), client.target))
        return EXIT_OK
    print(f"gramstyle {__version__}")
    print(f"python    {platform.python_version()} ({platform.machine()})")
    try:
        import torch
    except ImportError:
        print("torch     not installed (client-only install; use --server for remote work)")
        return EXIT_OK
    from gramstyle import kernels

    cuda = torch.cuda.is_available()
    device = f"cuda ({torch.cuda.get_device_name(0)})" if cuda else "cpu"
    print(f"torch     {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"device    {device}, {torch.get_num_threads()} CPU threads")
    print(f"kernel    {kernels.backend()}")
    return EXIT_OK


def cmd_losses(args: argparse.Namespace) -> int:
    """Print the loss table of a candidate image (in-process, or on --server)."""
    from gramstyle.client.report import format_losses

    candidate = load_image(args.candidate, "candidate", max_pixels=None)
    check_image_files(args)
    # The candidate's long side stands in for --size (it is what style_scale multiplies).
    values = dict(style_options_from_args(args), size=max(16, *candidate.size))
    options = StyleOptions(**values).validated()
    loss_options = {name: getattr(options, name) for name in LOSS_FIELDS}
    if args.gradient:
        check_output_path_npy(args.gradient)
        try:
            import numpy  # noqa: F401
        except ImportError:
            raise CLIError("--gradient: saving the gradient needs numpy (pip install numpy)",
                           EXIT_FAILURE) from None
    if args.server:
        with _connect(args) as client:
            report = client.compute_losses(
                args.candidate, args.content, args.style, gradient=bool(args.gradient),
                arch=args.arch or "", weights=args.weights or "", **loss_options)
        where = f"{report.device} on {client.target}, kernel {report.backend}"
        size = (report.width, report.height) if report.width else None
    else:
        engine = _load_engine(args)
        report = engine.compute_losses(args.candidate, args.content, args.style, options,
                                       gradient=bool(args.gradient))
        where = f"{engine.device}, kernel {engine.backend}"
        size = candidate.size
    print(format_losses(report.losses, {"content": options.content_weight,
                                        "style": options.style_weight,
                                        "tv": options.tv_weight}))
    if args.gradient:
        import numpy as np

        gradient = report.gradient
        buffer = io.BytesIO()
        np.save(buffer, gradient)
        write_bytes_atomic(buffer.getvalue(), args.gradient)
        size = size or (gradient.shape[2], gradient.shape[1])
        print(f"gradient  d total / d pixel, float32 {list(gradient.shape)}, L2 norm "
              f"{float(np.linalg.norm(gradient)):.6g}, max |g| {float(np.abs(gradient).max()):.6g}"
              f" -> {args.gradient}")
    print(f"computed on {where}" + (f" for a {size[0]}x{size[1]} candidate" if size else ""))
    return EXIT_OK


#: The StyleOptions fields that affect ComputeLosses.
LOSS_FIELDS = ("content_layers", "content_layer_weights", "style_layers", "style_layer_weights",
               "content_blend_weights", "style_blend_weights", "content_weight", "style_weight",
               "tv_weight", "style_scale", "precision")

#: Pillow format name -> the client's output_format name.
FORMATS_BY_PILLOW = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


def check_output_path_npy(path: str) -> None:
    """--gradient writes a NumPy .npy file; check the suffix and folder before any work."""
    if not path.endswith(".npy"):
        raise CLIError(f"--gradient: the file name must end in .npy, got {path!r}")
    folder = Path(path).parent
    if not folder.is_dir():
        raise CLIError(f"--gradient: folder does not exist: {str(folder)!r}")


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model once and serve gramstyle.v1.StyleTransfer until SIGTERM."""
    try:
        from gramstyle.server.serve import ServeConfig, configure_logging, run
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
        return run(config)
    except OSError as exc:  # port in use
        raise CLIError(f"--port: {exc}", EXIT_FAILURE) from None


def add_serve_parser(sub) -> None:
    from gramstyle.images import DEFAULT_MAX_PIXELS

    p = sub.add_parser("serve", help="run the gRPC server (gramstyle.v1.StyleTransfer)",
                       description="Load the model once and serve Stylize, ComputeLosses and "
                                   "GetServerInfo, plus grpc.health.v1 and reflection. Prints "
                                   "one 'ready' line; SIGTERM drains and exits 0.")
    add_model_options(p)
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
    g.add_argument("--grace", type=_finite_float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long in-flight calls may take to finish (default 30)")
    g.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics")
    g.add_argument("--log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.set_defaults(func=cmd_serve)


def add_losses_parser(sub) -> None:
    p = sub.add_parser("losses", help="print the losses of a candidate image (and its "
                       "gradient), without optimising",
                       description="Content, style, tv and total losses of CANDIDATE against "
                                   "the content and style targets, with a per-layer table. "
                                   "Content images are resized to the candidate's size.")
    p.add_argument("candidate", metavar="CANDIDATE", help="the image to score")
    add_style_options(p)
    add_model_options(p)
    add_remote_options(p)
    p.add_argument("--gradient", metavar="FILE.npy",
                   help="also compute d total / d pixel and save it (float32 [3,H,W])")
    p.set_defaults(func=cmd_losses)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gramstyle", description="Gatys-style neural style transfer (engine, service, CLI)")
    parser.add_argument("--version", action="version", version=f"gramstyle {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("stylize", help="stylize an image (in-process, or on a server)",
                       description="Optimise an image to match content features and style "
                                   "Gram matrices.")
    add_style_options(p)
    add_optimiser_options(p)
    add_model_options(p)
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", required=True, help="output image (.png, .jpg, .webp)")
    g.add_argument("--save-every", type=int, metavar="N",
                   help="also write the image every N iterations (out_0050.png, ...)")
    g.add_argument("--progress-sheet", metavar="PNG",
                   help="write the initial, intermediate and final images side by side")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_remote_options(p)
    p.set_defaults(func=cmd_stylize)

    add_losses_parser(sub)
    add_serve_parser(sub)

    p = sub.add_parser("info", help="print versions, device and kernel backend (or a "
                       "server's models, layers and limits)")
    add_remote_options(p)
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gramstyle`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"gramstyle: error: {flag_message(str(exc))}", file=sys.stderr)
        return exc.code
    except ServiceError as exc:
        # The server's message already names the request field; keep it verbatim.
        print(f"gramstyle: error: server answered {exc.code.name}: {exc.message}",
              file=sys.stderr)
        return EXIT_USAGE if exc.caller_mistake else EXIT_FAILURE
    except (ValueError, ImageError) as exc:
        print(f"gramstyle: error: {flag_message(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gramstyle: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # torch.OutOfMemoryError is checked by name: this module must not import torch.
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
            print(f"gramstyle: error: out of memory ({str(exc).splitlines()[0]}); lower "
                  "--size or --style-scale, or use --precision bf16", file=sys.stderr)
            return EXIT_FAILURE
        if os.environ.get("GRAMSTYLE_DEBUG"):
            raise
        # Anything else is a bug: say so in one line, with the traceback on request.
        print(f"gramstyle: error: internal error: {type(exc).__name__}: {exc} (set "
              "GRAMSTYLE_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
