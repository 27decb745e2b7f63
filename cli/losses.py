"""``gramstyle losses``: the loss table of a candidate image (and its gradient)."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from gramstyle.cli.flags import (
    EXIT_FAILURE,
    EXIT_OK,
    CLIError,
    add_model_flags,
    add_option_flags,
    add_remote_flags,
    check_image_files,
    connect,
    given_options,
    image_arguments,
    load_engine,
)
from gramstyle.cli.report import format_losses
from gramstyle.images import write_bytes_atomic
from gramstyle.options import StyleOptions


def add_parser(sub) -> None:
    p = sub.add_parser("losses", help="print the losses of a candidate image (and its "
                       "gradient), without optimising",
                       description="Content, style, tv and total losses of CANDIDATE against "
                                   "the content and style targets, with a per-layer table. "
                                   "Content images are resized to the candidate's size.")
    add_option_flags(p, "losses")
    add_model_flags(p)
    add_remote_flags(p)
    p.add_argument("--gradient", metavar="FILE.npy",
                   help="also compute d total / d pixel and save it (float32 [3,H,W])")
    p.set_defaults(func=run)


def check_gradient_path(path: str) -> None:
    """--gradient writes a NumPy .npy file; check the suffix and folder before any work."""
    if not path.endswith(".npy"):
        raise CLIError(f"--gradient: the file name must end in .npy, got {path!r}")
    folder = Path(path).parent
    if not folder.is_dir():
        raise CLIError(f"--gradient: folder does not exist: {str(folder)!r}")


def run(args: argparse.Namespace) -> int:
    """Print the loss table of a candidate image (in-process, or on --server)."""
    (candidate,) = check_image_files(args, "losses")["candidate"]
    images = image_arguments(args, "losses")
    given = given_options(args, "losses")
    # The candidate's long side stands in for size (the style images are scaled from it).
    options = StyleOptions(**given, size=max(16, *candidate)).validated()
    if args.gradient:
        check_gradient_path(args.gradient)
        try:
            import numpy  # noqa: F401
        except ImportError:
            raise CLIError("--gradient: saving the gradient needs numpy (pip install numpy)",
                           EXIT_FAILURE) from None
    if args.server:
        with connect(args) as client:
            report = client.compute_losses(
                **images, gradient=bool(args.gradient), arch=args.arch or "",
                weights=args.weights or "", **given)
        where = f"{report.device} on {client.target}, kernel {report.backend}"
    else:
        report = load_engine(args).compute_losses(**images, options=options,
                                                  gradient=bool(args.gradient))
        where = f"{report.device}, kernel {report.backend}"
    print(format_losses(report.losses, options))
    if args.gradient:
        import numpy as np

        gradient = report.gradient
        buffer = io.BytesIO()
        np.save(buffer, gradient)
        write_bytes_atomic(buffer.getvalue(), args.gradient)
        print(f"gradient  d total / d pixel, float32 {list(gradient.shape)}, L2 norm "
              f"{float(np.linalg.norm(gradient)):.6g}, max |g| {float(np.abs(gradient).max()):.6g}"
              f" -> {args.gradient}")
    precision = f", {report.precision}" if report.precision else ""
    print(f"computed on {where}{precision} for a {report.width}x{report.height} candidate")
    return EXIT_OK
