"""A cache of target features across requests: an LRU bounded in bytes.

Building an objective runs the network once per content image (its feature maps at the
content layers) and once per style image (its Gram matrices at the style layers). A client
that scores candidates with ComputeLosses, or stylizes many images with one style, asks for
the same targets again and again; with this cache, a repeated ComputeLosses costs one network
pass (the candidate's) instead of three.

One entry holds the targets of one image for one use:

    key = (kind, model, precision, digest, (width, height), layers)

- ``kind``: 'content' (feature maps) or 'style' (Gram matrices);
- ``model``: the engine's model key (arch, weights, pooling, device and a per-engine id);
- ``precision``: the precision the targets were computed in ('fp32' or 'bf16');
- ``digest``: :func:`image_digest` of the decoded image, so the same picture hits whichever
  way it arrived (path, bytes, PIL image);
- ``(width, height)``: the size the image is resized to before the network sees it. It is
  where ``size`` and ``style_scale`` enter the key: two requests that resize an image to the
  same pixels share its targets;
- ``layers``: the layer names, in the request's order.

Values are dicts of tensors (layer name -> tensor) and are shared between requests: nobody
may modify them in place. An entry larger than the whole budget is not stored. The cache is
thread-safe; two requests that miss the same key at once both compute it (the second store
wins), which costs time but never a wrong answer.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from PIL import Image

from gramstyle.errors import FieldError
from gramstyle.options import DEFAULT_TARGET_CACHE_MB

Targets = dict[str, torch.Tensor]


def image_digest(image: Image.Image) -> bytes:
    """A 128-bit BLAKE2b digest of a decoded image: its mode, size and pixel bytes."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.digest()


def nbytes(targets: Targets) -> int:
    """Bytes held by the tensors of one entry."""
    return sum(t.numel() * t.element_size() for t in targets.values())


@dataclass(frozen=True)
class CacheStats:
    """A snapshot: lookups that found an entry (``hits``) or not (``misses``) since the cache
    was made, and what it holds now."""

    hits: int
    misses: int
    bytes: int
    entries: int
    max_bytes: int


class TargetCache:
    """An LRU of target tensors holding at most ``max_bytes`` bytes (0 disables it)."""

    def __init__(self, max_bytes: int = DEFAULT_TARGET_CACHE_MB * 2**20):
        if max_bytes < 0:
            raise FieldError("target_cache_mb", f"must be >= 0, got {max_bytes / 2**20:g}",
                             max_bytes / 2**20)
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[Hashable, tuple[Targets, int]] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Targets | None:
        """The entry for ``key`` (now the most recently used), or None; counts a hit or miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry[0]

    def put(self, key: Hashable, targets: Targets) -> None:
        """Store an entry, evicting the least recently used ones to stay within budget."""
        size = nbytes(targets)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (targets, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted

    def get_or_compute(self, key: Hashable, compute: Callable[[], Targets]) -> Targets:
        """The cached entry, or ``compute()``'s result, stored."""
        targets = self.get(key)
        if targets is None:
            targets = compute()
            self.put(key, targets)
        return targets

    def clear(self) -> None:
        """Drop every entry (the hit and miss counts stay)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._bytes, len(self._entries),
                              self.max_bytes)

    def __len__(self) -> int:
        return len(self._entries)


__all__ = ["DEFAULT_TARGET_CACHE_MB", "CacheStats", "TargetCache", "Targets", "image_digest",
           "nbytes"]
