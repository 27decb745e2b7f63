"""``gramstyle info``: versions, device and kernel backend of this install, or a server's."""

from __future__ import annotations

import argparse
import platform

from gramstyle import __version__
from gramstyle.cli.flags import EXIT_OK, add_remote_flags, connect, refuse_remote_flags
from gramstyle.presets import PRESET_NAMES


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="print versions, device and kernel backend (or a "
                       "server's models, layers and limits)")
    add_remote_flags(p)
    p.set_defaults(func=run)


def presets_line() -> str:
    """The presets, for both modes: the CLI applies them, so any server takes them."""
    return (f"presets   {', '.join(PRESET_NAMES)} (stylize/losses/batch --preset NAME; "
            "docs/options.md, \"Presets\")")


def run(args: argparse.Namespace) -> int:
    if args.server:
        from gramstyle.cli.report import format_server_info

        with connect(args) as client:
            print(format_server_info(client.server_info(), client.target))
        print(presets_line())
        return EXIT_OK
    refuse_remote_flags(args)
    print(f"gramstyle {__version__}")
    print(f"python    {platform.python_version()} ({platform.machine()})")
    print(presets_line())
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
    problem = kernels.load_error()
    if problem:
        print(f"          the compiled op did not load: {problem}")
    from gramstyle.engine import precision

    where = torch.device("cuda" if cuda else "cpu")
    print(f"precision auto = {precision.resolve_precision('auto', where)} on {where.type} "
          f"({precision.describe(where)})")
    return EXIT_OK
