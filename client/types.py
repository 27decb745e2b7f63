"""Results the client returns: plain dataclasses, torch-free and numpy-free.

They mirror the engine's types (``gramstyle.server.Losses``, ``Progress``, ``StylizeResult``,
``LossReport``) field for field where they overlap, so code written for the in-process engine
(a progress callback, a result handler) works unchanged against a remote server.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from PIL import Image

from gramstyle.images import FORMATS, format_for_path, save_image, write_bytes_atomic
from gramstyle.v1 import gramstyle_pb2 as pb

_FORMAT_NAMES = {pb.IMAGE_FORMAT_UNSPECIFIED: "png", pb.IMAGE_FORMAT_PNG: "png",
                 pb.IMAGE_FORMAT_JPEG: "jpeg", pb.IMAGE_FORMAT_WEBP: "webp"}


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


@dataclass
class Losses:
    """Unweighted loss terms; ``total = content_weight*content + style_weight*style +
    tv_weight*tv``. The per-layer dicts map layer name to that layer's loss."""

    total: float
    content: float
    style: float
    tv: float
    content_layers: dict[str, float] = field(default_factory=dict)
    style_layers: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, m: pb.Losses) -> Losses:
        return cls(total=m.total, content=m.content, style=m.style, tv=m.tv,
                   content_layers=dict(m.content_layers), style_layers=dict(m.style_layers))


@dataclass
class Progress:
    """One progress message: the state after ``iteration`` of ``iterations`` iterations
    (0 is the start image). ``preview_bytes`` holds the encoded preview when one was asked
    for; ``image`` decodes it (once)."""

    iteration: int
    iterations: int
    losses: Losses
    elapsed_s: float
    preview_bytes: bytes | None = field(default=None, repr=False)
    _image: Image.Image | None = field(default=None, repr=False, compare=False)

    @property
    def image(self) -> Image.Image | None:
        """The preview as a PIL image, or None when previews were not asked for."""
        if self._image is None and self.preview_bytes:
            self._image = _decode(self.preview_bytes)
        return self._image

    @classmethod
    def from_proto(cls, m: pb.Progress) -> Progress:
        return cls(iteration=m.iteration, iterations=m.iterations,
                   losses=Losses.from_proto(m.losses), elapsed_s=m.elapsed_s,
                   preview_bytes=m.preview.data if m.HasField("preview") else None)


@dataclass
class StylizeResult:
    """The final image, as encoded bytes (``data``, in ``format``) and as a PIL image
    (``image``), with the server's stats."""

    data: bytes
    format: str
    width: int
    height: int
    iterations: int
    losses: Losses
    elapsed_s: float
    backend: str
    device: str
    arch: str
    weights: str
    _image: Image.Image | None = field(default=None, repr=False, compare=False)

    @property
    def image(self) -> Image.Image:
        if self._image is None:
            self._image = _decode(self.data)
        return self._image

    def save(self, path: str) -> None:
        """Write the image atomically; re-encodes only if the suffix asks another format."""
        if format_for_path(path) == FORMATS[self.format]:
            write_bytes_atomic(self.data, path)
        else:
            save_image(self.image, path)

    @classmethod
    def from_proto(cls, m: pb.Result) -> StylizeResult:
        s = m.stats
        return cls(data=m.image.data, format=_FORMAT_NAMES.get(m.image.format, "png"),
                   width=m.image.width, height=m.image.height, iterations=s.iterations,
                   losses=Losses.from_proto(s.losses), elapsed_s=s.elapsed_s,
                   backend=s.backend, device=s.device, arch=s.arch, weights=s.weights)


@dataclass
class LossReport:
    """ComputeLosses' answer. The gradient (d total / d pixel, RGB in [0, 1], shape
    [3, height, width]) is kept as raw little-endian float32 bytes so that the client needs
    no numpy; :attr:`gradient` converts it."""

    losses: Losses
    width: int
    height: int
    backend: str
    device: str
    elapsed_s: float
    gradient_shape: tuple[int, ...] | None = None
    gradient_bytes: bytes | None = field(default=None, repr=False)

    @property
    def gradient(self):
        """The gradient as a float32 numpy array, or None when not asked for.

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

    @classmethod
    def from_proto(cls, m: pb.ComputeLossesResponse) -> LossReport:
        has_gradient = m.HasField("gradient")
        return cls(losses=Losses.from_proto(m.losses), width=m.width, height=m.height,
                   backend=m.backend, device=m.device, elapsed_s=m.elapsed_s,
                   gradient_shape=tuple(m.gradient.shape) if has_gradient else None,
                   gradient_bytes=m.gradient.data if has_gradient else None)


@dataclass
class ModelInfo:
    arch: str
    weights: str
    pooling: str
    layer_names: list[str]
    is_default: bool


@dataclass
class ServerInfo:
    """GetServerInfo's answer. ``limits`` maps limit name (max_pixels, max_size,
    max_iterations, max_message_bytes, workers, queue_size) to its value."""

    version: str
    models: list[ModelInfo]
    backend: str
    device: str
    limits: dict[str, int]
    busy_workers: int
    queued: int

    @classmethod
    def from_proto(cls, m: pb.ServerInfo) -> ServerInfo:
        limits = {f.name: getattr(m.limits, f.name) for f in m.limits.DESCRIPTOR.fields}
        return cls(version=m.version,
                   models=[ModelInfo(arch=x.arch, weights=x.weights, pooling=x.pooling,
                                     layer_names=list(x.layer_names), is_default=x.is_default)
                           for x in m.models],
                   backend=m.backend, device=m.device, limits=limits,
                   busy_workers=m.busy_workers, queued=m.queued)
