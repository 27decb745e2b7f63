"""What a run returns: one set of types for the engine, the server and the client.

Plain dataclasses, torch-free and numpy-free, so the in-process engine and a remote server
return the same fields and code written for one (a progress callback, a result handler)
works unchanged against the other. :mod:`gramstyle.codec` converts them to and from the
wire messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from gramstyle.images import FORMATS, format_for_path, save_image, write_bytes_atomic


@dataclass
class Losses:
    """Loss terms of one image. ``content``, ``style`` and ``tv`` are unweighted;
    ``total`` is their sum weighted by the run's content, style and tv weights.
    ``content_layers``/``style_layers`` map each layer name to its unweighted relative loss."""

    total: float
    content: float
    style: float
    tv: float
    content_layers: dict[str, float] = field(default_factory=dict)
    style_layers: dict[str, float] = field(default_factory=dict)


@dataclass
class Progress:
    """The state after ``iteration`` of ``iterations`` optimiser steps (0: the start image).

    ``losses`` are those of that image; ``image`` is the image itself (RGB), only when the
    caller asked for previews. ``elapsed_s`` counts seconds since the run started.

    ``attempt`` is 1, except from the remote client after it restarted the call from the
    beginning because its server failed mid-run (UNAVAILABLE; see the client's ``retries``):
    then it is 2, 3, ... and ``iteration`` starts again at 0, so a progress bar should reset
    when ``attempt`` changes. The in-process engine always reports 1."""

    iteration: int
    iterations: int
    losses: Losses
    elapsed_s: float
    image: Image.Image | None = field(default=None, repr=False)
    attempt: int = 1
    #: The precision the network runs in: 'fp32' or 'bf16' (what precision 'auto' chose);
    #: '' from a server that does not report it.
    precision: str = ""
    #: The scale running, 1-based, of ``scales`` (the coarse-to-fine schedule,
    #: :func:`gramstyle.options.schedule`), and its long side in px; 0 from a server that
    #: does not report them.
    scale: int = 0
    scales: int = 0
    scale_size: int = 0
    #: In a tiled run, a report from within an iteration (at most one a second): the tile
    #: pass (1: the loss, without a graph; 2: the gradient) and its tile, 1-based, of
    #: ``tiles``; ``iteration`` and ``losses`` are then the latest iteration's. 0 otherwise.
    tile_pass: int = 0
    tile: int = 0
    tiles: int = 0

    @property
    def where(self) -> str:
        """Where the run is, for a progress line: 'scale 2/3 1448px, tile 5/12 (gradient)';
        '' when the report names neither (one scale, not tiled, or an older server)."""
        parts = []
        if self.scales > 1:
            parts.append(f"scale {self.scale}/{self.scales} {self.scale_size}px")
        if self.tiles:
            stage = "gradient" if self.tile_pass == 2 else "loss"
            parts.append(f"tile {self.tile}/{self.tiles} ({stage})")
        return ", ".join(parts)

    @property
    def restarted(self) -> bool:
        """True for the messages of a repeated attempt (``attempt > 1``)."""
        return self.attempt > 1


@dataclass
class StylizeResult:
    """The output image with its stats.

    ``image`` is the RGB result. A remote result also keeps the bytes the server sent
    (``data``, encoded as ``format``: 'png', 'jpeg' or 'webp'), so :meth:`save` writes them
    without re-encoding when the suffix asks for the same format."""

    image: Image.Image = field(repr=False)
    #: Optimiser steps actually run, over all scales.
    iterations: int
    #: Losses of the returned image (before colour preservation).
    losses: Losses
    #: Seconds the run took on the engine.
    elapsed_s: float
    #: Gram kernel backend: 'cpu', 'cuda' or 'einsum'.
    backend: str
    device: str
    arch: str = ""
    weights: str = ""
    data: bytes | None = field(default=None, repr=False)
    format: str = "png"
    #: The precision the network ran in: 'fp32' or 'bf16' (what precision 'auto' chose).
    precision: str = ""
    #: Why the run (its last scale) ended: 'converged' (the loss stopped improving, see the
    #: ``tolerance`` option) or 'cap' (it ran all ``iterations``). '' from a server that
    #: does not report it.
    stop_reason: str = ""

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    def save(self, path: str) -> None:
        """Write the image atomically; re-encodes only if the suffix asks another format."""
        if self.data is not None and format_for_path(path) == FORMATS[self.format]:
            write_bytes_atomic(self.data, path)
        else:
            save_image(self.image, path)


@dataclass
class LossReport:
    """ComputeLosses' answer for a ``width`` x ``height`` candidate.

    The gradient (d total / d pixel, RGB pixels in [0, 1], float32 [3, height, width]) is
    kept as raw little-endian row-major bytes so that no numpy is needed to carry it;
    :attr:`gradient` converts it."""

    losses: Losses
    width: int
    height: int
    backend: str
    device: str
    elapsed_s: float
    gradient_shape: tuple[int, ...] | None = None
    gradient_bytes: bytes | None = field(default=None, repr=False)
    #: The precision the network ran in: 'fp32' or 'bf16'.
    precision: str = ""

    @property
    def gradient(self):
        """The gradient as a read-only float32 numpy array, or None when not asked for.

        Needs numpy (installed with the server extra, or ``pip install numpy``).
        """
        if self.gradient_bytes is None:
            return None
        try:
            import numpy as np
        except ImportError as exc:  # the client-only install has no numpy
            raise ImportError("LossReport.gradient needs numpy; use gradient_bytes (float32 "
                              "little-endian, row-major) or pip install numpy") from exc
        return np.frombuffer(self.gradient_bytes, dtype="<f4").reshape(self.gradient_shape)


@dataclass
class ModelInfo:
    """One loaded model: ``weights`` is what requests name ('imagenet', 'random' or a file
    name); ``layer_names`` are in network order."""

    arch: str
    weights: str
    pooling: str
    layer_names: list[str]
    is_default: bool


@dataclass
class ServerInfo:
    """GetServerInfo's answer. ``limits`` maps each limit's name (a field of the proto's
    Limits message) to its value: max_pixels (per input image, from the header), max_size
    (output long side, pixels), max_iterations, max_message_bytes, workers, queue_size
    (requests that may wait), max_images (per request), max_request_memory_bytes and
    memory_budget_bytes (0: no limit), default_size and default_iterations (what an unset
    size / iterations gets there; 0 from a server that does not report them)."""

    version: str
    models: list[ModelInfo]
    backend: str
    device: str
    limits: dict[str, int]
    busy_workers: int
    queued: int
    #: The precision the default 'auto' runs in on the default model's device ('fp32' or
    #: 'bf16'); '' from a server that does not report it.
    precision: str = ""


__all__ = ["LossReport", "Losses", "ModelInfo", "Progress", "ServerInfo",
           "StylizeResult"]
