"""``gramstyle stylize``: optimise an image, in-process or on a server."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from gramstyle import codec
from gramstyle.cli.flags import (
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
from gramstyle.images import check_output_path, format_for_path, load_image, save_image
from gramstyle.options import StyleOptions, total_iterations


def frame_path(output: Path, iteration: int) -> Path:
    """Where --save-every writes the frame of ``iteration``: out.png -> out_0050.png."""
    return output.with_name(f"{output.stem}_{iteration:04d}{output.suffix}")


def finish_bar(bar, iterations: int, stop_reason: str) -> None:
    """End the tqdm ``bar`` at the iteration where the run ended: a run that converged early
    (see the tolerance option) stops before its cap of iterations x scales, and a bar left
    at 47 % would look interrupted. Its total becomes the iterations run, and it says why."""
    if bar.disable or iterations <= 0:  # -q; or not reported (an old server)
        return
    bar.total = iterations
    bar.update(iterations - bar.n)
    if stop_reason == "converged":
        bar.set_description(f"{bar.desc} (converged)", refresh=False)
    bar.refresh()


def add_parser(sub) -> None:
    p = sub.add_parser("stylize", help="stylize an image (in-process, or on a server)",
                       description="Optimise an image to match content features and style "
                                   "Gram matrices.")
    add_option_flags(p, "stylize")
    add_model_flags(p)
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", required=True, help="output image (.png, .jpg, .webp)")
    g.add_argument("--save-every", type=int, metavar="N",
                   help="also write the image every N iterations (out_0050.png, ...)")
    g.add_argument("--progress-sheet", metavar="PNG",
                   help="write the initial, intermediate and final images side by side")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_remote_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run style transfer with a tqdm bar, frames and a progress sheet."""
    from tqdm import tqdm

    output = check_output_path(args.output, "output")
    if args.progress_sheet:
        check_output_path(args.progress_sheet, "progress_sheet")
    if args.save_every is not None and args.save_every < 1:
        raise CLIError(f"--save-every: must be >= 1, got {args.save_every}")
    given = given_options(args, "stylize")
    options = StyleOptions(**given).validated()
    if not args.content and not args.style:
        raise CLIError("--content/--style: give at least one image")
    total = total_iterations(options)
    if args.save_every and args.save_every >= total:
        print(f"gramstyle: warning: --save-every {args.save_every} is not below the "
              f"{total} iterations; no frames will be written", file=sys.stderr)
    check_image_files(args, "stylize")
    images = image_arguments(args, "stylize")

    every = options.progress_every
    frames: list = []
    want_preview = bool(args.save_every or args.progress_sheet)

    attempt = 1

    # The last preview: a run that converged early ends before `iterations`, and its final
    # image belongs on the sheet too.
    latest: list = []

    def on_progress(p) -> None:
        nonlocal attempt
        if p.attempt != attempt:  # the server failed mid-run; the client started it again
            attempt = p.attempt
            frames.clear()
            bar.reset()
            bar.set_description(f"stylize (attempt {attempt})")
            if not args.quiet:
                tqdm.write(f"gramstyle: the server failed mid-run (UNAVAILABLE); starting "
                           f"again from iteration 0, attempt {attempt}", file=sys.stderr)
        at = {"at": p.where} if p.where else {}  # the scale, and the tile of a tiled run
        # Set before the update, which shows it (a tile report moves no iteration: refresh).
        bar.set_postfix(total=f"{p.losses.total:.4g}", content=f"{p.losses.content:.3g}",
                        style=f"{p.losses.style:.3g}", **at, refresh=bool(p.tiles))
        bar.update(p.iteration - bar.n)
        if p.image is None or p.tiles:  # a tile report carries the latest iteration's losses
            return
        if args.save_every and p.iteration and p.iteration % args.save_every == 0 \
                and p.iteration < p.iterations:
            save_image(p.image, frame_path(output, p.iteration), "--save-every")
        if p.iteration % every == 0 or p.iteration == p.iterations:
            frames.append((p.iteration, p.image))
        latest[:] = [(p.iteration, p.image)]

    with tqdm(total=total, unit="it", desc="stylize", disable=args.quiet) as bar:
        if args.server:
            # Every progress message with a preview carries an encoded image, so ask for
            # them only as often as frames are wanted; without previews, messages are tiny.
            given["progress_every"] = (math.gcd(every, args.save_every or every)
                                       if want_preview else 1)
            with connect(args) as client:
                result = client.stylize(
                    **images, progress=on_progress, preview=want_preview,
                    arch=args.arch or "", weights=args.weights or "",
                    output_format=codec.format_name(format_for_path(output)), **given)
        else:
            # The bar moves every iteration; frames are picked above. (A checked copy: 1 is
            # always a valid interval, so the engine does not check the options again.)
            every_step = options.resolved(None, progress_every=1)
            result = load_engine(args).stylize(**images, options=every_step,
                                               progress=on_progress, preview=want_preview)
        finish_bar(bar, result.iterations, result.stop_reason)
    save_image(result.image, output, "output")
    if args.progress_sheet:
        from gramstyle.cli.progress_sheet import save_progress_sheet

        label, source = ("content", args.content[0]) if args.content else ("style", args.style[0])
        if latest and (not frames or frames[-1][0] != latest[0][0]):
            frames.append(latest[0])
        save_progress_sheet(frames, args.progress_sheet, (label, load_image(source, label)))
    losses = result.losses
    ended = " (converged)" if result.stop_reason == "converged" else ""
    precision = f", {result.precision}" if result.precision else ""
    print(f"wrote {output} ({result.image.width}x{result.image.height}) after "
          f"{result.iterations} iterations{ended} in {result.elapsed_s:.1f} s; total "
          f"{losses.total:.4g} (content {losses.content:.4g}, style {losses.style:.4g}, tv "
          f"{losses.tv:.4g}); kernel {result.backend} on {result.device}{precision}")
    return EXIT_OK
