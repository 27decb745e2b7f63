"""``gramstyle weights fetch``: download and check the ImageNet weights ahead of time."""

from __future__ import annotations

import argparse

from gramstyle.cli.flags import EXIT_FAILURE, EXIT_OK, CLIError, import_server_extra
from gramstyle.options import ARCHS


def add_parser(sub) -> None:
    p = sub.add_parser("weights", help="fetch and check the ImageNet weights ahead of time",
                       description="Model weights, ahead of time.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    fetch = actions.add_parser(
        "fetch", help="download torchvision's ImageNet VGG weights into its cache and check "
                      "them; prints the path and the SHA-256",
        description="Download torchvision's ImageNet VGG weights (what --weights imagenet "
                    "loads) into torchvision's cache, $TORCH_HOME/hub/checkpoints (default "
                    "~/.cache/torch/hub/checkpoints), unless a good copy is there; check the "
                    "SHA-256 against the file name's hash prefix and load it strictly; print "
                    "the path and the SHA-256. Run it on a machine with internet, then copy "
                    "the file to the same folder under TORCH_HOME on machines without.")
    fetch.add_argument("--arch", choices=ARCHS, default="vgg19",
                       help="vgg19 (default, the engine's default network) or vgg16")
    fetch.add_argument("-q", "--quiet", action="store_true", help="no download progress bar")
    fetch.set_defaults(func=run_fetch)


def run_fetch(args: argparse.Namespace) -> int:
    imagenet_weights = import_server_extra("gramstyle.engine.imagenet_weights",
                                           "weights fetch")
    try:
        fetched = imagenet_weights.fetch_imagenet_weights(args.arch, progress=not args.quiet)
    except OSError as exc:
        raise CLIError(str(exc), EXIT_FAILURE) from None
    how = "downloaded" if fetched.downloaded else "already in the cache"
    print(f"ImageNet {fetched.arch} weights: {how}; the hash and every key and shape check out")
    print(f"path    {fetched.path}")
    print(f"sha256  {fetched.sha256}")
    print(f"size    {fetched.size} bytes")
    return EXIT_OK
