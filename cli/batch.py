"""``gramstyle batch``: one style setup over many content images, into one output folder.

    gramstyle batch photos/ extra.jpg 'more/*.png' --style starry.jpg -o styled/
    gramstyle batch photos/ --style starry.jpg -o styled/ --server host:50051 --parallel 2

Each content image is its own run (``stylize`` with that one image); repeating ``--content``
in ``stylize`` instead *blends* several content targets into one picture. In-process the
model loads once and the style targets are computed once (the engine's target cache keeps
them across the runs); with ``--server`` the server's cache does the same, and ``--parallel
N`` keeps N calls in flight.

Everything that concerns the whole batch (options, style images, network, server) is
checked before the first image runs and stops it with the usual exit codes; a content image
that fails (cannot be decoded, too large, the server refuses it) is reported and the batch
goes on. Exit status: 0 when every image was written or skipped, 1 when any failed.
"""

from __future__ import annotations

import argparse
import glob
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gramstyle import codec
from gramstyle.cli.flags import (
    EXIT_FAILURE,
    EXIT_OK,
    CLIError,
    add_model_flags,
    add_option_flags,
    add_remote_flags,
    check_image_files,
    connect,
    flag_message,
    given_options,
    image_arguments,
    load_engine,
    refuse_remote_flags,
)
from gramstyle.client.errors import ServiceError
from gramstyle.images import save_image
from gramstyle.inputs import input_named
from gramstyle.options import StyleOptions

#: The files a folder (or a glob) contributes: the extensions of the decodable formats.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
#: Output formats (the extension of every output file).
OUTPUT_FORMATS = ("png", "jpg", "webp")
#: Each run has one content image: its errors start with this field.
CONTENT_FIELD = input_named("content").error_field(0)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "batch", help="stylize many content images with one style setup (a folder, files, "
        "globs) into one output folder",
        description="Stylize every content image (files, folders, globs) with the same style "
                    "images and options; the model and the style targets are built once. "
                    "A failing image is reported and skipped; exit 1 if any failed.")
    p.add_argument("inputs", nargs="+", metavar="CONTENT",
                   help="content images: files, folders (their images, not subfolders) or "
                        "globs such as 'photos/*.jpg'")
    add_option_flags(p, "stylize", skip_inputs=("content",))
    add_model_flags(p)
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output-dir", required=True, metavar="DIR",
                   help="output folder (created if missing): one NAME.FORMAT per content "
                        "image NAME.*")
    g.add_argument("--format", choices=OUTPUT_FORMATS, default="png",
                   help="output format (default png)")
    g.add_argument("--skip-existing", action="store_true",
                   help="leave images whose output exists (resume an interrupted batch); "
                        "without it, existing outputs are replaced")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.add_argument("--parallel", type=int, metavar="N",
                   help="with --server: keep N calls in flight (default 1)")
    add_remote_flags(p)
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------- the file list

def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def collect_contents(inputs: Sequence[str]) -> list[Path]:
    """The content images ``inputs`` name, in order, each once: a file as given, a folder's
    images (by extension, sorted, not recursive), a glob's matching images (sorted; for a
    pattern the shell did not expand). CLIError (exit 2) for an input that names nothing."""
    found: list[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            matches = _images_in(path)
            if not matches:
                raise CLIError(f"CONTENT: no images ({', '.join(IMAGE_SUFFIXES)}) in folder "
                               f"{text!r}")
        elif path.is_file():
            matches = [path]
        elif glob.has_magic(text):
            matches = []
            for match in sorted(Path(m) for m in glob.glob(text)):
                if match.is_dir():
                    matches += _images_in(match)
                elif match.suffix.lower() in IMAGE_SUFFIXES:
                    matches.append(match)
            if not matches:
                raise CLIError(f"CONTENT: no images match {text!r}")
        else:
            raise CLIError(f"CONTENT: no such file or folder: {text!r}")
        found += matches
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def output_paths(contents: Sequence[Path], folder: Path, fmt: str) -> list[Path]:
    """``folder/NAME.fmt`` for each content image NAME.*; CLIError when two contents would
    write the same output, or an output would replace a content image."""
    outputs = [folder / f"{path.stem}.{fmt}" for path in contents]
    sources = {path.resolve(): path for path in contents}
    seen: dict[Path, Path] = {}
    for content, output in zip(contents, outputs, strict=True):
        if output in seen:
            raise CLIError(f"--output-dir: {seen[output]} and {content} would both be written "
                           f"to {output}; rename one or run them as two batches")
        seen[output] = content
        if output.resolve() in sources:
            raise CLIError(f"--output-dir: the output {output} would replace the content "
                           f"image {sources[output.resolve()]}; choose another folder or "
                           f"--format")
    return outputs


# ---------------------------------------------------------------------------- the runs

class Tally:
    """ok / failed / skipped counts, shared by the worker threads."""

    def __init__(self) -> None:
        self.ok = self.failed = self.skipped = 0
        self._lock = threading.Lock()

    def add(self, outcome: str) -> None:
        with self._lock:
            setattr(self, outcome, getattr(self, outcome) + 1)

    def summary(self) -> str:
        return f"{self.ok} ok, {self.failed} failed, {self.skipped} skipped"


def _about_content(message: str) -> str:
    """The message without its "content[0]: " (the line starts with the file's path)."""
    return message.removeprefix(f"{CONTENT_FIELD}: ")


def _describe(exc: Exception) -> str:
    """One line for a failed image: what the single-image command would print."""
    if isinstance(exc, ServiceError):
        return f"server answered {exc.code.name}: {_about_content(exc.message)}"
    if isinstance(exc, ValueError):  # ImageError included: "content[0]: cannot decode ..."
        return flag_message(_about_content(str(exc)))
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return f"out of memory ({str(exc).splitlines()[0] if str(exc) else 'no detail'})"
    return f"{type(exc).__name__}: {exc}"


def run(args: argparse.Namespace) -> int:
    """Stylize every content image; one bar counts the files, a summary line ends it."""
    from tqdm import tqdm

    started = time.perf_counter()
    parallel = 1 if args.parallel is None else args.parallel
    if parallel < 1:
        raise CLIError(f"--parallel: must be >= 1, got {parallel}")
    if args.parallel is not None and not args.server:
        raise CLIError("--parallel: applies to calls to --server; in-process the images run "
                       "one after another")
    if not args.server:
        refuse_remote_flags(args)
    given = given_options(args, "stylize")
    options = StyleOptions(**given).validated()
    contents = collect_contents(args.inputs)
    folder = Path(args.output_dir)
    if folder.exists() and not folder.is_dir():
        raise CLIError(f"--output-dir: {str(folder)!r} is not a folder")
    outputs = output_paths(contents, folder, args.format)
    # The style setup is the same for every image: decode it once, before anything runs.
    args.content = []
    check_image_files(args, "stylize")
    images = image_arguments(args, "stylize")
    del images["content"]

    tally = Tally()
    todo = []
    for content, output in zip(contents, outputs, strict=True):
        if args.skip_existing and output.exists():
            tally.add("skipped")
        else:
            todo.append((content, output))

    bar = tqdm(total=len(contents), initial=tally.skipped, unit="image", desc="batch",
               disable=args.quiet)

    def one(stylize: Callable[..., object], content: Path, output: Path) -> None:
        try:
            result = stylize(content)
            save_image(result.image, output, "output")
        except Exception as exc:  # one image's failure is reported; the batch goes on
            tally.add("failed")
            tqdm.write(f"gramstyle: error: {content}: {_describe(exc)}", file=sys.stderr)
        else:
            tally.add("ok")
        bar.set_postfix_str(tally.summary(), refresh=False)
        bar.update(1)

    try:
        if not todo:
            pass  # every output exists: nothing to load or call
        elif args.server:
            with connect(args) as client:
                client.server_info()  # an unreachable server fails the batch once, here
                folder.mkdir(parents=True, exist_ok=True)

                def stylize(content: Path):
                    return client.stylize(content=[str(content)], **images,
                                          arch=args.arch or "", weights=args.weights or "",
                                          output_format=codec.format_name(args.format),
                                          **given)

                pool = ThreadPoolExecutor(max_workers=parallel)
                try:
                    for future in [pool.submit(one, stylize, c, o) for c, o in todo]:
                        future.result()
                finally:  # interrupted: the calls in flight end, the queued ones never start
                    pool.shutdown(wait=True, cancel_futures=True)
        else:
            engine = load_engine(args)
            options = engine.validate(options)  # layers vs the network: once, not per image
            folder.mkdir(parents=True, exist_ok=True)

            def stylize(content: Path):
                return engine.stylize([str(content)], **images, options=options)

            for content, output in todo:
                one(stylize, content, output)
    finally:
        bar.close()
    print(f"batch: {tally.summary()} of {len(contents)} images in {folder} "
          f"({time.perf_counter() - started:.1f} s)")
    return EXIT_OK if tally.failed == 0 else EXIT_FAILURE
