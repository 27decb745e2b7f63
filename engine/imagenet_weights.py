"""Fetch and check torchvision's ImageNet VGG weights ahead of time (``gramstyle weights
fetch``), for machines, images and clusters without internet.

The file goes where ``--weights imagenet`` looks for it: torchvision's download cache,
``$TORCH_HOME/hub/checkpoints/<name>`` (see :func:`~gramstyle.engine.extractor.
imagenet_weights_path`). It is checked three ways: torch.hub's own test while downloading,
its SHA-256 against the hash prefix in torchvision's file name (``vgg19-dcbb9e9d.pth``: the
digest starts with ``dcbb9e9d``), and a strict load into the VGG ``features`` (every key and
shape). A cached file that fails the hash test is downloaded again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from gramstyle.engine.extractor import (
    _BUILDERS,
    WeightsError,
    _load_state,
    imagenet_weights_path,
)
from gramstyle.options import ARCHS, check_choice


@dataclass
class FetchedWeights:
    """The ImageNet weights file of one architecture, downloaded (or found) and checked."""

    arch: str
    url: str
    path: Path
    #: Hex SHA-256 of the whole file.
    sha256: str
    #: File size in bytes.
    size: int
    #: False when a good copy was already in the cache.
    downloaded: bool


def imagenet_url(arch: str) -> str:
    """torchvision's download URL of the IMAGENET1K_V1 weights of ``arch``."""
    return _BUILDERS[arch][1].url


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_imagenet_weights(arch: str = "vgg19", progress: bool = True) -> FetchedWeights:
    """Download the ImageNet weights of ``arch`` into torchvision's cache unless a good copy
    is there, check them, and say where they are.

    Raises:
        ValueError: an unknown ``arch``.
        OSError: the download failed (no internet, proxy, a corrupt transfer).
        WeightsError: the file does not load into the VGG features.
    """
    check_choice("arch", arch, ARCHS)
    url, path = imagenet_url(arch), imagenet_weights_path(arch)
    match = torch.hub.HASH_REGEX.search(path.name)
    prefix = match.group(1) if match else ""
    if path.is_file() and not file_sha256(path).startswith(prefix):
        path.unlink()  # a truncated or altered copy: fetch it again
    downloaded = not path.is_file()
    if downloaded:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Written to a temporary file next to `path` and renamed: never half a file.
            torch.hub.download_url_to_file(url, str(path), hash_prefix=prefix or None,
                                           progress=progress)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad hash a
            raise OSError(                      # RuntimeError
                f"weights fetch: cannot download the ImageNet {arch} weights from {url} "
                f"({type(exc).__name__}: {exc}); this needs internet access (or a proxy in "
                f"https_proxy)") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{str(path)!r} is not a torch state_dict "
                           f"({type(exc).__name__}); delete it and fetch again",
                           str(path)) from exc
    with torch.device("meta"):  # the layers' shapes, without initialising 140 M parameters
        features = _BUILDERS[arch][0](weights=None).features
    features.to_empty(device="cpu")
    _load_state(features, state, f"ImageNet {arch} file {path}", arch)
    return FetchedWeights(arch, url, path, file_sha256(path), path.stat().st_size, downloaded)
