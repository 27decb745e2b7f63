"""The ``gramstyle`` command line.

    gramstyle stylize --content cat.png --style starry.jpg -o out.png --size 512
    gramstyle info

Exit codes: 0 success, 2 a caller's mistake (bad option, bad image, bad weights file),
1 anything else. Errors name the option and the bad value. Nothing half-written is left at
an output path: files are written atomically at the end.

This module must stay importable without torch (client-only install): the engine is
imported only when a command runs in-process.
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from gramstyle import __version__
from gramstyle.images import ImageError, check_output_path, save_image
from gramstyle.server.options import (
    ARCHS,
    DEFAULT_CONTENT_LAYERS,
    DEFAULT_STYLE_LAYERS,
    DEVICES,
    INITS,
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


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--arch, --weights, --pooling, --device: which network runs (in-process or `serve`)."""
    group = parser.add_argument_group("network")
    group.add_argument("--arch", choices=ARCHS, default="vgg19", help="feature extractor")
    group.add_argument("--weights", default="imagenet",
                       help="imagenet (torchvision download cache), random (seeded RandomNet) "
                            "or a path to a VGG / VGG-features state_dict (default: imagenet)")
    group.add_argument("--pooling", choices=POOLINGS, default="max")
    group.add_argument("--device", choices=DEVICES, default="auto")


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
    g.add_argument("--init", choices=INITS, default=d.init,
                   help="start image: content, seeded noise, style, or --init-image")
    g.add_argument("--init-image", metavar="IMAGE", help="start image for --init image")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    g.add_argument("--iterations", type=int, default=d.iterations)
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
        init=getattr(args, "init", "content"),
        optimizer=getattr(args, "optimizer", "lbfgs"),
        iterations=getattr(args, "iterations", 1),
        learning_rate=getattr(args, "lr", None),
        seed=getattr(args, "seed", 0),
        size=args.size,
        style_scale=args.style_scale,
        preserve_colors=getattr(args, "preserve_colors", False),
        precision=args.precision,
        progress_every=getattr(args, "progress_every", 10),
    )


def frame_path(output: Path, iteration: int) -> Path:
    """Where --save-every writes the frame of ``iteration``: out.png -> out_0050.png."""
    return output.with_name(f"{output.stem}_{iteration:04d}{output.suffix}")


# ---------------------------------------------------------------------------- commands

def _load_engine(args: argparse.Namespace):
    try:
        from gramstyle.server.engine import StyleTransfer
    except ImportError as exc:
        raise CLIError(f"running in-process needs the server extra (pip install "
                       f"'gramstyle[server]'): {exc}; or pass --server HOST:PORT",
                       EXIT_FAILURE) from exc
    return StyleTransfer(arch=args.arch, weights=args.weights, pooling=args.pooling,
                         device=args.device)


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

    engine = _load_engine(args)
    every = options.progress_every
    options.progress_every = 1  # the bar moves every iteration; frames are picked below
    frames: list = []
    want_preview = bool(args.save_every or args.progress_sheet)

    with tqdm(total=options.iterations, unit="it", desc="stylize", disable=args.quiet) as bar:
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

        result = engine.stylize(args.content, args.style, options, init_image=args.init_image,
                                progress=on_progress, preview=want_preview)
    save_image(result.image, output, "output")
    if args.progress_sheet:
        from gramstyle.client.progress_sheet import save_progress_sheet
        from gramstyle.images import load_image

        label, source = ("content", args.content[0]) if args.content else ("style", args.style[0])
        save_progress_sheet(frames, args.progress_sheet, (label, load_image(source, label)))
    losses = result.losses
    print(f"wrote {output} ({result.image.width}x{result.image.height}) after "
          f"{result.iterations} iterations in {result.elapsed_s:.1f} s; total {losses.total:.4g} "
          f"(content {losses.content:.4g}, style {losses.style:.4g}, tv {losses.tv:.4g}); "
          f"kernel {result.backend} on {result.device}")
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, the device and the kernel backend of this install."""
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
    p.set_defaults(func=cmd_stylize)

    p = sub.add_parser("info", help="print versions, device and kernel backend")
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
    except (ValueError, ImageError) as exc:
        print(f"gramstyle: error: {flag_message(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gramstyle: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
# CLI-READY-FOR-SERVICE: the service helper may now add --server, serve and losses.
