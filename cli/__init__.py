"""The ``gramstyle`` command line: one module per command.

    gramstyle stylize --content cat.png --style starry.jpg -o out.png --size 512
    gramstyle batch photos/ --style starry.jpg -o styled/  (every image of a folder)
    gramstyle info
    gramstyle losses candidate.png --content cat.png --style starry.jpg
    gramstyle serve --arch vgg16 --weights vgg16.pth --port 50051
    gramstyle health --server localhost:50051           (exit 0 when SERVING)
    gramstyle weights fetch --arch vgg19                (ImageNet weights, ahead of time)
    gramstyle stylize ... --server localhost:50051      (stylize/info/losses on a server)

Exit codes: 0 success, 2 a caller's mistake (bad option, bad image, bad weights file; for a
server: INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE, ...), 1 anything else; 141
(quietly) when the reader of stdout went away (``gramstyle info | head -1``). A server
error prints its status code name and message. Errors name the option and the bad value.
Nothing half-written is left at an output path: files are written atomically at the end.

This package stays importable without torch (client-only install): the engine and the
server are imported only when a command runs in-process or serves.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from gramstyle import __version__
from gramstyle.cli import batch, health, info, losses, serve, stylize, weights
from gramstyle.cli.flags import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CLIError,
    flag_message,
)
from gramstyle.client.errors import ServiceError

__all__ = ["EXIT_BROKEN_PIPE", "EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "CLIError",
           "build_parser", "flag_message", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gramstyle", description="Gatys-style neural style transfer (engine, service, CLI)")
    parser.add_argument("--version", action="version", version=f"gramstyle {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (stylize, batch, losses, serve, info, health, weights):
        command.add_parser(sub)
    return parser


#: The exit status when stdout's reader went away: 128 + SIGPIPE, as a shell reports a
#: command that SIGPIPE stopped.
EXIT_BROKEN_PIPE = 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush of what is still
    buffered does not fail again with "Exception ignored ... BrokenPipeError"."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (e.g. captured in tests)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gramstyle`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        # The reader of stdout went away (`gramstyle info | head -1`): end quietly, as a
        # Unix tool stopped by SIGPIPE does.
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except CLIError as exc:
        print(f"gramstyle: error: {exc}", file=sys.stderr)
        return exc.code
    except ServiceError as exc:
        # The server's message already names the request field; keep it verbatim.
        tries = f" (after {exc.attempts} attempts)" if exc.attempts > 1 else ""
        print(f"gramstyle: error: server answered {exc.code.name}: {exc.message}{tries}",
              file=sys.stderr)
        return EXIT_USAGE if exc.caller_mistake else EXIT_FAILURE
    except ValueError as exc:  # FieldError (ImageError, WeightsError ...): named by its flag
        print(f"gramstyle: error: {flag_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gramstyle: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # torch.OutOfMemoryError is checked by name: this package must not import torch.
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
