"""Options for one style-transfer run, with validation.

Every check raises ``ValueError`` whose message starts with the option's name and shows the
bad value, e.g. ``"iterations: must be >= 1, got 0"``. The gRPC service maps these to
INVALID_ARGUMENT and the CLI to exit code 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

DEFAULT_CONTENT_LAYERS = ("relu4_2",)
DEFAULT_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")

INITS = ("content", "noise", "style", "image")
OPTIMIZERS = ("lbfgs", "adam")
PRECISIONS = ("fp32", "bf16")
POOLINGS = ("max", "avg")
ARCHS = ("vgg19", "vgg16")
DEVICES = ("auto", "cpu", "cuda")

#: Hard limits; the service may lower them.
MAX_SIZE = 2048
MAX_ITERATIONS = 10_000
MAX_SCALES = 8
#: Smallest long side of the coarsest scale.
MIN_SCALE_SIZE = 32


def check_weight(name: str, value: float) -> float:
    """A loss or blend weight: finite and >= 0."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be a number, got {value!r}") from None
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(f"{name}: must be a finite number >= 0, got {value}")
    return value


def check_weights(name: str, values: Sequence[float] | None, count: int) -> tuple[float, ...]:
    """Per-item weights: ``count`` of them, each finite and >= 0, not all zero.

    ``None`` means equal weights of 1.
    """
    if values is None:
        return (1.0,) * count
    values = tuple(values)
    if len(values) != count:
        raise ValueError(f"{name}: expected {count} value(s), one per item, got {len(values)}: "
                         f"{list(values)}")
    checked = tuple(check_weight(f"{name}[{i}]", v) for i, v in enumerate(values))
    if count and sum(checked) == 0:
        raise ValueError(f"{name}: at least one weight must be > 0, got {list(checked)}")
    return checked


def layer_names(name: str, value: str | Sequence[str | int]) -> tuple[str, ...]:
    """Layer names as a tuple; a string is taken as a comma-separated list."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if value is None or not isinstance(value, Sequence):
        raise ValueError(f"{name}: expected a list of layer names, got {value!r}")
    return tuple(str(v).strip() for v in value)


def scale_sizes(size: int, scales: int) -> list[int]:
    """Long sides of a coarse-to-fine pyramid: ``scales`` sizes growing by sqrt(2) to ``size``.

    >>> scale_sizes(512, 3)
    [256, 362, 512]
    """
    return [round(size / math.sqrt(2) ** (scales - 1 - k)) for k in range(scales)]


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: must be one of {', '.join(choices)}, got {value!r}")
    return value


@dataclass
class StyleOptions:
    """Everything that controls one run, apart from the images and the loaded network.

    Loss weights (see README "Losses" for the exact formulas):
        total = content_weight * content + style_weight * style + tv_weight * tv

    Layer and blend weights are relative: they are normalised to sum to 1.
    """

    content_layers: tuple[str, ...] = DEFAULT_CONTENT_LAYERS
    #: One weight per content layer (None: equal).
    content_layer_weights: tuple[float, ...] | None = None
    style_layers: tuple[str, ...] = DEFAULT_STYLE_LAYERS
    #: One weight per style layer (None: equal).
    style_layer_weights: tuple[float, ...] | None = None
    #: One weight per content image (None: equal).
    content_blend_weights: tuple[float, ...] | None = None
    #: One weight per style image (None: equal).
    style_blend_weights: tuple[float, ...] | None = None
    content_weight: float = 1.0
    style_weight: float = 5.0
    tv_weight: float = 0.0
    #: Initial image: 'content', 'noise' (seeded), 'style', or 'image' (the init_image).
    #: None: 'image' when an init image is given, else 'content' when there is a content
    #: image, else 'noise'.
    init: str | None = None
    optimizer: str = "lbfgs"
    iterations: int = 300
    #: Step size; None picks the optimiser's default (L-BFGS 1.0, Adam 0.02 in [0,1] pixels).
    learning_rate: float | None = None
    seed: int = 0
    #: Output long side in pixels.
    size: int = 512
    #: Style images are resized to long side = size * style_scale.
    style_scale: float = 1.0
    #: Coarse-to-fine: optimise at this many sizes, growing by sqrt(2) up to ``size``, each
    #: for ``iterations`` steps and starting from the previous result (1: one scale).
    scales: int = 1
    #: Keep the content image's colours: transfer luminance only (YIQ).
    preserve_colors: bool = False
    precision: str = "fp32"
    #: Report progress after 0, N, 2N, ... iterations and after the last one.
    progress_every: int = 10

    def validated(self, max_size: int = MAX_SIZE, max_iterations: int = MAX_ITERATIONS
                  ) -> StyleOptions:
        """Check every field; return self. Raises ValueError naming the field and value."""
        self.content_layers = layer_names("content_layers", self.content_layers)
        self.style_layers = layer_names("style_layers", self.style_layers)
        if not self.content_layers and not self.style_layers:
            raise ValueError("content_layers/style_layers: at least one layer is needed")
        self.content_layer_weights = (
            check_weights("content_layer_weights", self.content_layer_weights,
                          len(self.content_layers)) if self.content_layers else ())
        self.style_layer_weights = (
            check_weights("style_layer_weights", self.style_layer_weights,
                          len(self.style_layers)) if self.style_layers else ())
        for name in ("content_weight", "style_weight", "tv_weight"):
            setattr(self, name, check_weight(name, getattr(self, name)))
        if self.init is not None:
            check_choice("init", self.init, INITS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool):
            raise ValueError(f"iterations: must be an integer, got {self.iterations!r}")
        if not 1 <= self.iterations <= max_iterations:
            raise ValueError(f"iterations: must be between 1 and {max_iterations}, "
                             f"got {self.iterations}")
        if not isinstance(self.size, int) or not 16 <= self.size <= max_size:
            raise ValueError(f"size: must be an integer between 16 and {max_size} pixels, "
                             f"got {self.size}")
        if self.learning_rate is not None:
            lr = check_weight("learning_rate", self.learning_rate)
            if lr == 0:
                raise ValueError("learning_rate: must be > 0, got 0.0")
            self.learning_rate = lr
        scale = check_weight("style_scale", self.style_scale)
        if scale == 0 or self.size * scale > max_size:
            raise ValueError(f"style_scale: must be > 0 and keep size*style_scale <= {max_size}, "
                             f"got {self.style_scale}")
        if not isinstance(self.scales, int) or not 1 <= self.scales <= MAX_SCALES:
            raise ValueError(f"scales: must be an integer between 1 and {MAX_SCALES}, "
                             f"got {self.scales!r}")
        if self.scales > 1 and scale_sizes(self.size, self.scales)[0] < MIN_SCALE_SIZE:
            raise ValueError(f"scales: {self.scales} scales from size {self.size} would start "
                             f"below {MIN_SCALE_SIZE} px; use fewer scales or a larger size")
        if self.iterations * self.scales > max_iterations:
            raise ValueError(f"iterations: iterations*scales must be at most {max_iterations}, "
                             f"got {self.iterations}*{self.scales}")
        if (not isinstance(self.progress_every, int) or isinstance(self.progress_every, bool)
                or self.progress_every < 1):
            raise ValueError(
                f"progress_every: must be an integer >= 1, got {self.progress_every!r}")
        if (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                or not -(2**63) <= self.seed < 2**63):
            raise ValueError(f"seed: must be a 64-bit integer, got {self.seed!r}")
        return self

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
