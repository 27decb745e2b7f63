"""The options of one style-transfer run, each declared once.

Every field of :class:`StyleOptions` carries an :class:`OptionSpec` in its dataclass
metadata: its kind, bounds, help text, CLI flag and which calls take it. Everything else is
derived from that declaration:

- validation, once (:meth:`StyleOptions.validated`: a frozen, checked copy), with
  :class:`~gramstyle.errors.FieldError` errors whose ``.field`` is the option and whose
  message starts with it and shows the bad value, e.g. ``"iterations: must be between 1 and
  10000, got 0"``; every float option is bounded within float32's range;
- the proto conversion (:mod:`gramstyle.codec`: an option travels in the request field of the
  same name);
- the CLI flags (:mod:`gramstyle.cli.flags`);
- the options table in ``docs/options.md`` (:func:`markdown_table`, checked by a test).

Adding an option means: declare it here, add the proto field of the same name, and use it in
the engine. This module is torch-free (the client and the CLI import it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import FrozenInstanceError, dataclass, field, fields
from typing import Any

from gramstyle.errors import FieldError
from gramstyle.v1 import gramstyle_pb2 as pb

DEFAULT_CONTENT_LAYERS = ("relu4_2",)
DEFAULT_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")

#: Network choices (chosen when an engine or server starts, not per request).
POOLINGS = ("max", "avg")
ARCHS = ("vgg19", "vgg16")
DEVICES = ("auto", "cpu", "cuda")
#: The network an engine or ``gramstyle serve`` loads when not told otherwise.
DEFAULT_ARCH = "vgg19"
DEFAULT_WEIGHTS = "imagenet"
DEFAULT_POOLING = "max"
DEFAULT_DEVICE = "auto"
MODEL_DEFAULTS = {"arch": DEFAULT_ARCH, "weights": DEFAULT_WEIGHTS, "pooling": DEFAULT_POOLING,
                  "device": DEFAULT_DEVICE}
#: The target cache's default budget, MiB (an engine's, and ``gramstyle serve
#: --target-cache-mb``).
DEFAULT_TARGET_CACHE_MB = 256

#: Hard limits; the service may lower them.
MAX_SIZE = 4096
MAX_ITERATIONS = 10_000
MAX_SCALES = 8
#: Smallest long side of the coarsest scale.
MIN_SCALE_SIZE = 32
#: ``scales`` 0 (the default, "auto"): one scale up to this long side (px); above it, the
#: automatic coarse-to-fine schedule of :func:`schedule` starts at or below it.
AUTO_SCALES_ABOVE = 1024
#: The ``tile`` option: its named values, and the smallest side in pixels (the total stride
#: of VGG's deepest layers: a tile's interior is a multiple of it, see gramstyle.engine.tiles).
TILE_CHOICES = ("auto", "off")
MIN_TILE = 16

#: Early stop (the ``tolerance`` option): every CONVERGENCE_CHECK_EVERY iterations of a scale,
#: the run compares the best total loss so far with the best one CONVERGENCE_WINDOW iterations
#: earlier and stops the scale when the relative improvement is below ``tolerance``. The
#: default was chosen with bench/time_to_quality.py (docs/benchmarks.md).
CONVERGENCE_WINDOW = 20
CONVERGENCE_CHECK_EVERY = 5
DEFAULT_TOLERANCE = 0.0125

#: Option kinds: how a value is checked, sent over the wire and given on the command line.
#: int, float, bool: a scalar; choice: one of the names of a proto enum (``enum``);
#: layers: layer names; layer_weights: one weight per layer of ``of``; blend_weights: one
#: weight per image of the request field ``of``.
#: tile: "auto", "off" or an int in [low, high] (the ``tile`` option).
KINDS = ("int", "float", "bool", "choice", "layers", "layer_weights", "blend_weights", "tile")
#: Scopes: "losses" options shape the objective (Stylize and ComputeLosses take them);
#: "stylize" options drive the optimisation (Stylize only).
SCOPES = ("losses", "stylize")


def enum_prefix(enum: Any) -> str:
    """The value prefix of a proto enum: ``Precision`` -> ``PRECISION_``."""
    name = enum.DESCRIPTOR.name
    return "".join("_" + c if c.isupper() and i else c for i, c in enumerate(name)).upper() + "_"


def enum_choices(enum: Any) -> tuple[str, ...]:
    """The option values a proto enum stands for, in declaration order, without UNSPECIFIED:
    ``Optimizer`` -> ``('lbfgs', 'adam')``."""
    prefix = enum_prefix(enum)
    return tuple(v.name.removeprefix(prefix).lower() for v in enum.DESCRIPTOR.values
                 if not v.name.endswith("_UNSPECIFIED"))


@dataclass(frozen=True)
class OptionSpec:
    """Everything any layer needs to know about one option (see the module docstring)."""

    kind: str
    help: str
    scope: str = "stylize"
    #: Inclusive bounds; a string names a limit passed to :meth:`StyleOptions.validated`.
    low: float | None = None
    high: float | str | None = None
    #: ``low`` itself is not allowed (e.g. a learning rate of 0).
    low_exclusive: bool = False
    #: Unit shown in messages and help ("pixels").
    unit: str = ""
    #: Range message, when the default ("must be an integer between ...") does not fit.
    range_error: str | None = None
    #: kind choice: the proto enum whose values are the choices.
    enum: Any = None
    #: None is allowed and means "decided later" (see the help text).
    optional: bool = False
    #: kind layer_weights / blend_weights: the field the weights belong to.
    of: str | None = None
    #: CLI flag; default ``--name-with-dashes``.
    flag: str | None = None
    metavar: str | None = None

    @property
    def choices(self) -> tuple[str, ...]:
        return enum_choices(self.enum) if self.enum is not None else ()


def option(default: Any, kind: str, help: str, **spec: Any) -> Any:
    """A StyleOptions field with its declaration."""
    assert kind in KINDS and spec.get("scope", "stylize") in SCOPES
    return field(default=default, metadata={"spec": OptionSpec(kind, help, **spec)})


# ---------------------------------------------------------------------------- value checks

#: Longest echo of a caller's value in an error message (see :func:`preview`).
PREVIEW_CHARS = 80


def preview(value: Any, limit: int = PREVIEW_CHARS, quoted: bool = True) -> str:
    """``repr(value)`` (``str(value)`` when not ``quoted``) cut to ``limit`` characters plus
    "… (N chars)" when longer.

    Every error message that echoes a caller's value goes through this, so a 17,000-character
    layer name cannot blow a status message past gRPC's metadata limit.
    """
    text = repr(value) if quoted else str(value)
    if len(text) <= limit:
        return text
    length = len(value) if isinstance(value, str) else len(text)
    return f"{text[:limit]}… ({length} chars)"


#: The float32 range: the engine computes in float32, so every float option is bounded by
#: the largest finite float32 (or less), and a magnitude below the smallest normal float32
#: counts as 0 (it would be subnormal or 0 on the device: a "learning rate" of 1e-320 is 0).
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38
#: The largest learning rate: Adam's first step is 10 times its rate (the bias correction),
#: so float32's largest would overflow there; and no step a million times the pixel range
#: [0, 1] is meaningful.
MAX_LEARNING_RATE = 1e6


def check_float(name: str, value: Any, low: float = 0.0, high: float = FLOAT32_MAX,
                low_exclusive: bool = False) -> float:
    """A float option or weight: a finite number in [low, high] (``low`` excluded when
    ``low_exclusive``); -0.0 and magnitudes below :data:`FLOAT32_TINY` become 0.0 first.
    Raises FieldError naming ``name`` and the value as given."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise FieldError(name, f"must be a number, got {preview(value)}", value) from None
    relation = f"> {low:g}" if low_exclusive else f">= {low:g}"
    if math.isnan(number) or math.isinf(number):
        raise FieldError(name, f"must be a finite number {relation}, got {number}", value)
    if number < low or (low_exclusive and number == low):
        what = "" if low_exclusive else "a finite number "  # the messages as they always were
        raise FieldError(name, f"must be {what}{relation}, got {number}", value)
    if number > high:
        limit = f"{high:g}" + (" (the largest float32)" if high == FLOAT32_MAX else "")
        raise FieldError(name, f"must be at most {limit}, got {number}", value)
    if abs(number) < FLOAT32_TINY:
        if low_exclusive and low == 0:
            raise FieldError(name, f"must be at least {FLOAT32_TINY:g} (the smallest normal "
                             f"float32), got {number}", value)
        number = 0.0  # also turns -0.0 into 0.0
    return number


def check_weight(name: str, value: Any) -> float:
    """A loss, layer or blend weight: finite, in [0, FLOAT32_MAX]."""
    return check_float(name, value)


def check_weights(name: str, values: Sequence[float] | None, count: int) -> tuple[float, ...]:
    """Per-item weights whose values are already checked (:meth:`StyleOptions.validated`):
    ``count`` of them, not all zero. ``None`` means equal weights of 1."""
    if values is None:
        return (1.0,) * count
    values = tuple(values)
    if len(values) != count:
        raise FieldError(name, f"expected {count} value(s), one per item, got {len(values)}: "
                         f"{preview(list(values))}", values)
    if count and sum(values) == 0:
        raise FieldError(name, f"at least one weight must be > 0, got {preview(list(values))}",
                         values)
    return values


def split_list(text: str) -> tuple[str, ...]:
    """A comma-separated list: its stripped, non-empty parts. The one place a list option
    given as text (a CLI flag, a keyword argument) is split."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def layer_names(name: str, value: str | Sequence[str | int]) -> tuple[str, ...]:
    """Layer names as a tuple; a string is taken as a comma-separated list."""
    if isinstance(value, str):
        return split_list(value)
    if value is None or not isinstance(value, Sequence):
        raise FieldError(name, f"expected a list of layer names, got {preview(value)}", value)
    return tuple(str(v).strip() for v in value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise FieldError(name, f"must be one of {', '.join(choices)}, got {preview(value)}",
                         value)
    return value


def scale_sizes(size: int, scales: int) -> list[int]:
    """Long sides of a coarse-to-fine pyramid: ``scales`` sizes growing by sqrt(2) to ``size``.

    >>> scale_sizes(512, 3)
    [256, 362, 512]
    """
    return [round(size / math.sqrt(2) ** (scales - 1 - k)) for k in range(scales)]


def auto_scales(size: int) -> int:
    """How many scales ``scales`` 0 ("auto") runs at long side ``size``: 1 up to
    :data:`AUTO_SCALES_ABOVE`, else the fewest sqrt(2) steps that start at or below it
    (1448 px: 2 scales, 2048: 3, 4096: 5)."""
    count = 1
    while size / math.sqrt(2) ** (count - 1) > AUTO_SCALES_ABOVE + 0.5:
        count += 1
    return count


def schedule(size: int, scales: int, iterations: int) -> list[tuple[int, int]]:
    """(long side px, iteration cap) of each scale, coarsest first.

    ``scales`` N >= 1: the N sizes of :func:`scale_sizes`, each for ``iterations`` steps.
    ``scales`` 0 ("auto"): one scale of ``iterations`` up to :data:`AUTO_SCALES_ABOVE` px;
    above it :func:`auto_scales` sizes, the coarsest for ``iterations`` steps and each finer
    one for half the previous one's (at least 1). Each sqrt(2) step doubles the pixels and
    so the cost of an iteration: every scale then takes about the same time, and most
    iterations run where they are cheap.

    >>> schedule(4096, 0, 300)
    [(1024, 300), (1448, 150), (2048, 75), (2896, 38), (4096, 19)]
    """
    if scales:
        return [(side, iterations) for side in scale_sizes(size, scales)]
    sides = scale_sizes(size, auto_scales(size))
    return [(side, max(1, round(iterations / 2**k))) for k, side in enumerate(sides)]


def total_iterations(options: Any) -> int:
    """The iteration caps of every scale of ``options`` (:func:`schedule`) added up."""
    return sum(n for _, n in schedule(options.size, options.scales, options.iterations))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_value(name: str, spec: OptionSpec, value: Any, limits: dict[str, float]) -> Any:
    """One option's own checks (kind and bounds); returns the normalised value.

    Checks that involve several options live in :meth:`StyleOptions.validated`, and those
    that need the network (layer names, feature-map sizes) in the engine.
    """
    if value is None and spec.optional:
        return None
    high = limits[spec.high] if isinstance(spec.high, str) else spec.high
    if spec.kind == "int":
        if not _is_int(value) or (spec.low is not None and value < spec.low) or (
                high is not None and value > high):
            if high is None:
                raise FieldError(name, f"must be an integer >= {spec.low:g}, got "
                                 f"{preview(value)}", value)
            text = spec.range_error or "must be an integer between {low} and {high}{unit}, " \
                                       "got {value}"
            unit = f" {spec.unit}" if spec.unit else ""
            raise FieldError(name, text.format(low=f"{spec.low:g}", high=f"{high:g}",
                                               unit=unit, value=value), value)
        return value
    if spec.kind == "tile":
        if value in TILE_CHOICES or (_is_int(value) and spec.low <= value <= high):
            return value
        raise FieldError(name, f"must be auto, off or an integer between {spec.low:g} and "
                         f"{high:g} pixels, got {preview(value)}", value)
    if spec.kind == "float":
        return check_float(name, value, spec.low or 0.0,
                           FLOAT32_MAX if high is None else min(high, FLOAT32_MAX),
                           spec.low_exclusive)
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise FieldError(name, f"must be true or false, got {preview(value)}", value)
        return value
    if spec.kind == "choice":
        return check_choice(name, value, spec.choices)
    if spec.kind == "layers":
        return layer_names(name, value)
    if value is None:
        return None
    if isinstance(value, str):
        value = split_list(value)
    if not isinstance(value, Sequence):
        raise FieldError(name, f"expected a list of numbers, got {preview(value)}", value)
    # Each weight's value here; their count against the layers in validated(), against the
    # images (blend weights) where the images are.
    return tuple(check_weight(f"{name}[{i}]", v) for i, v in enumerate(value))


@dataclass
class StyleOptions:
    """Everything that controls one run, apart from the images and the loaded network.

    Loss weights (see docs/options.md, "Losses", for the exact formulas):
        total = content_weight * content + style_weight * style + tv_weight * tv

    Layer and blend weights are relative: they are normalised to sum to 1.
    """

    content_layers: tuple[str, ...] = option(
        DEFAULT_CONTENT_LAYERS, "layers", "content loss layers: names (conv1_1, relu4_2, "
        "pool3, ...) or features indices (0, 2, 5, ...)", scope="losses", metavar="L1,L2")
    content_layer_weights: tuple[float, ...] | None = option(
        None, "layer_weights", "one weight per content layer (default: equal)",
        scope="losses", of="content_layers", optional=True, metavar="W1,W2")
    style_layers: tuple[str, ...] = option(
        DEFAULT_STYLE_LAYERS, "layers", "style (Gram) loss layers", scope="losses",
        metavar="L1,L2")
    style_layer_weights: tuple[float, ...] | None = option(
        None, "layer_weights", "one weight per style layer (default: equal)", scope="losses",
        of="style_layers", optional=True, metavar="W1,W2")
    content_blend_weights: tuple[float, ...] | None = option(
        None, "blend_weights", "blend weights of the content images (default: equal)",
        scope="losses", of="content", optional=True, flag="--content-weights",
        metavar="W1,W2")
    style_blend_weights: tuple[float, ...] | None = option(
        None, "blend_weights", "blend weights of the style images (default: equal)",
        scope="losses", of="style", optional=True, flag="--style-weights", metavar="W1,W2")
    content_weight: float = option(
        1.0, "float", "alpha, the content loss weight; 0 = texture synthesis", scope="losses",
        low=0, high=FLOAT32_MAX)
    style_weight: float = option(
        5.0, "float", "beta, the style loss weight; 0 = feature inversion", scope="losses",
        low=0, high=FLOAT32_MAX)
    tv_weight: float = option(
        0.0, "float", "total-variation (smoothness) loss weight", scope="losses", low=0,
        high=FLOAT32_MAX)
    init: str | None = option(
        None, "choice", "start image: content, seeded noise, style, or image (the init "
        "image). Default: image when an init image is given, else content when there is a "
        "content image, else noise", enum=pb.Init, optional=True)
    optimizer: str = option("lbfgs", "choice", "lbfgs (history 20) or adam",
                            enum=pb.Optimizer)
    iterations: int = option(
        300, "int", "optimiser steps (per scale)", low=1, high="max_iterations",
        range_error="must be between {low} and {high}, got {value}")
    tolerance: float = option(
        DEFAULT_TOLERANCE, "float", "stop a scale early when the best total loss so far improved "
        f"by less than this fraction over the last {CONVERGENCE_WINDOW} iterations (checked "
        f"every {CONVERGENCE_CHECK_EVERY}); 0 = always run all iterations, which stay the cap",
        low=0, high=1, metavar="REL")
    learning_rate: float | None = option(
        None, "float", "step size (default: 1.0 for lbfgs, 0.02 for adam, in [0,1] pixels)",
        low=0, low_exclusive=True, high=MAX_LEARNING_RATE, optional=True, flag="--lr")
    seed: int = option(0, "int", "seed of the noise start image (64-bit); same seed and inputs "
                       "give the same output on one machine", low=-(2**63),
                       high=2**63 - 1, range_error="must be a 64-bit integer, got {value}")
    size: int = option(512, "int", f"output long side in pixels (16 to {MAX_SIZE}); the short "
                       "side must reach the deepest layer (16 px for relu5_1)", low=16,
                       high="max_size",
                       unit="pixels")
    style_scale: float = option(
        1.0, "float", "style images are resized to long side size * style_scale",
        scope="losses", low=0, high=FLOAT32_MAX)
    scales: int = option(
        0, "int", "coarse-to-fine: optimise at this many sizes growing by sqrt(2) up to size, "
        "each for `iterations` steps from the previous result; 0 = auto: one scale up to "
        f"{AUTO_SCALES_ABOVE} px, above it starting at or below {AUTO_SCALES_ABOVE} px with "
        "`iterations` steps and half as many at each finer scale (docs/tiling.md)", low=0,
        high=MAX_SCALES)
    preserve_colors: bool = option(
        False, "bool", "keep the content image's colours: transfer luminance only (YIQ)")
    colour: str = option(
        "style", "choice", "colour control: style (the style's colours), luminance "
        "(luminance-only transfer, then the content's colours), or match (the style images' "
        "colours matched to the content's before the run)", scope="losses", enum=pb.Colour)
    precision: str = option(
        "auto", "choice", "auto: bf16 where the hardware runs it natively (CUDA with bf16, x86 "
        "CPUs with AVX512-BF16 or AMX), else fp32; fp32; or bf16 autocast for the network "
        "(losses and pixels stay fp32). Results report the precision used",
        scope="losses", enum=pb.Precision)
    tile: str | int = option(
        "auto", "tile", "compute the loss and its gradient over tiles of about this many "
        "pixels a side (rounded down to a multiple of the network's stride), each with a halo "
        "that keeps them exact: the network's memory is bounded by the tile, not the image "
        "(docs/tiling.md); off = the whole image at once; auto = tile only when the untiled "
        "run would not fit the server's per-request memory limit (in-process: the memory "
        "available, scale by scale), with the largest tile that fits", scope="losses", low=MIN_TILE,
        high="max_size", unit="pixels", metavar="auto|off|PX")
    progress_every: int = option(
        10, "int", "report progress after 0, N, 2N, ... iterations and after the last one",
        low=1)

    @classmethod
    def specs(cls, scope: str | None = None) -> Iterator[tuple[str, OptionSpec, Any]]:
        """(name, spec, default) of every option, or of those in ``scope``."""
        for f in fields(cls):
            spec = f.metadata["spec"]
            if scope is None or spec.scope == scope or scope == "stylize":
                yield f.name, spec, f.default

    # ------------------------------------------------------------------ validation
    #
    # The one place options are checked. validated() returns a frozen, checked copy that
    # remembers the limits it was checked against; a checked copy asked again within the
    # same (or looser) limits is returned as it is, so no layer checks twice. Assigning to a
    # field of a frozen copy raises dataclasses.FrozenInstanceError; dataclasses.replace()
    # makes an unchecked, mutable copy.

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_checked") is not None:
            raise FrozenInstanceError(f"cannot assign to field {name!r}: validated options are "
                                      "frozen; use dataclasses.replace()")
        object.__setattr__(self, name, value)

    @property
    def checked_limits(self) -> tuple[int, int] | None:
        """(max_size, max_iterations) these options were validated against, or None."""
        return self.__dict__.get("_checked")

    @property
    def network(self) -> Any:
        """The key of the engine that checked these options against its network (layer
        names made canonical, precision resolved), or None."""
        return self.__dict__.get("_network")

    def validated(self, max_size: int = MAX_SIZE, max_iterations: int = MAX_ITERATIONS
                  ) -> StyleOptions:
        """A frozen, checked copy (``self`` when already checked within these limits).

        Raises FieldError (a ValueError) naming the field and the value.
        """
        checked = self.checked_limits
        if checked is not None and checked[0] <= max_size and checked[1] <= max_iterations:
            return self
        limits = {"max_size": max_size, "max_iterations": max_iterations}
        values = {name: check_value(name, spec, getattr(self, name), limits)
                  for name, spec, _ in self.specs()}
        if not values["content_layers"] and not values["style_layers"]:
            raise FieldError("content_layers/style_layers", "at least one layer is needed")
        for name, spec, _ in self.specs():
            if spec.kind == "layer_weights" and values[name] is not None:  # None: equal
                layers = values[spec.of]
                values[name] = check_weights(name, values[name], len(layers)) if layers else ()
        size, style_scale, scales = values["size"], values["style_scale"], values["scales"]
        if style_scale == 0 or size * style_scale > max_size:
            raise FieldError("style_scale", f"must be > 0 and keep size*style_scale <= "
                             f"{max_size}, got {style_scale}", style_scale)
        if scales > 1 and scale_sizes(size, scales)[0] < MIN_SCALE_SIZE:
            raise FieldError("scales", f"{scales} scales from size {size} would start below "
                             f"{MIN_SCALE_SIZE} px; use fewer scales or a larger size", scales)
        if values["iterations"] * max(1, scales) > max_iterations:
            raise FieldError("iterations", f"iterations*scales must be at most "
                             f"{max_iterations}, got {values['iterations']}*{scales}",
                             values["iterations"])
        planned = sum(n for _, n in schedule(size, scales, values["iterations"]))
        if planned > max_iterations:  # scales 0 (auto): about twice iterations at big sizes
            raise FieldError("iterations", f"the automatic schedule at size {size} runs "
                             f"{planned} iterations over {auto_scales(size)} scales, more "
                             f"than {max_iterations}; lower iterations or set scales",
                             values["iterations"])
        return self._frozen(values, (max_size, max_iterations), None)

    def resolved(self, network: Any, **changes: Any) -> StyleOptions:
        """A frozen copy of validated options with ``changes``, marked as checked against
        ``network`` (an engine's key, or None). The changes are taken as they are: values
        the caller has checked (the engine: canonical layer names, the precision resolved)
        or that are valid by construction (the CLI: a progress interval of 1)."""
        if self.checked_limits is None:
            raise TypeError("resolved() needs validated options")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return self._frozen({**values, **changes}, self.checked_limits, network)

    @classmethod
    def _frozen(cls, values: dict[str, Any], limits: tuple[int, int], network: Any
                ) -> StyleOptions:
        options = cls(**values)
        options.__dict__["_checked"] = limits
        options.__dict__["_network"] = network
        return options

    @classmethod
    def from_given(cls, given: dict[str, Any], max_size: int = MAX_SIZE,
                   max_iterations: int = MAX_ITERATIONS) -> StyleOptions:
        """Validated options from the options a caller gave (the others absent).

        An absent option takes its default; where that default is over a server limit (a
        server whose ``max_iterations`` or ``max_size`` is below 300 or 512), it takes the
        most the limit allows instead (:func:`default_within`).
        """
        scales = given.get("scales", cls.scales)
        size = given.get("size", min(cls.size, max_size))
        if _is_int(scales) and scales == 0 and _is_int(size):
            scales = auto_scales(size)  # the schedule's total is below iterations * scales
        defaults = default_within(max_size, max_iterations,
                                  scales if _is_int(scales) and scales >= 1 else 1)
        return cls(**{**{k: v for k, v in defaults.items() if k not in given}, **given}
                   ).validated(max_size, max_iterations)


def default_within(max_size: int = MAX_SIZE, max_iterations: int = MAX_ITERATIONS,
                   scales: int = 1) -> dict[str, int]:
    """The defaults of the limited options on a server with these limits: ``size`` is
    min(512, max_size), ``iterations`` min(300, max_iterations // scales) (at least 1)."""
    defaults = {name: default for name, _, default in StyleOptions.specs()}
    return {"size": min(defaults["size"], max_size),
            "iterations": max(1, min(defaults["iterations"], max_iterations // scales))}


def tile_pixels(tile: str | int) -> int:
    """The tile side in pixels of a checked ``tile`` value, 0 for no tiling ("off", and
    "auto" where nothing resolved it: see :meth:`StyleTransfer.validate`)."""
    return tile if _is_int(tile) else 0


def flag_of(name: str, spec: OptionSpec) -> str:
    """The CLI flag of an option."""
    return spec.flag or "--" + name.replace("_", "-")


def markdown_table() -> str:
    """The options table of docs/options.md, generated from the declarations."""
    rows = ["| option | CLI flag | default | calls | meaning |", "|---|---|---|---|---|"]
    for name, spec, default in StyleOptions.specs():
        if isinstance(default, tuple):
            shown = ",".join(default)
        elif default is None:
            shown = "(see meaning)" if spec.kind == "choice" or spec.kind == "float" else "equal"
        else:
            shown = str(default).lower() if isinstance(default, bool) else str(default)
        if spec.kind == "choice":
            shown += " (" + " \\| ".join(spec.choices) + ")"
        calls = "Stylize, ComputeLosses" if spec.scope == "losses" else "Stylize"
        rows.append(f"| `{name}` | `{flag_of(name, spec)}` | {shown} | {calls} | {spec.help} |")
    return "\n".join(rows)


__all__ = [
    "ARCHS", "CONVERGENCE_CHECK_EVERY", "CONVERGENCE_WINDOW", "DEFAULT_ARCH",
    "DEFAULT_CONTENT_LAYERS", "DEFAULT_DEVICE", "DEFAULT_POOLING", "DEFAULT_TARGET_CACHE_MB",
    "DEFAULT_TOLERANCE", "DEFAULT_STYLE_LAYERS", "DEFAULT_WEIGHTS", "DEVICES", "FLOAT32_MAX",
    "FLOAT32_TINY", "MAX_ITERATIONS", "MAX_LEARNING_RATE", "MAX_SCALES", "MAX_SIZE",
    "MIN_SCALE_SIZE", "MIN_TILE", "MODEL_DEFAULTS", "POOLINGS", "TILE_CHOICES", "OptionSpec",
    "StyleOptions", "AUTO_SCALES_ABOVE", "auto_scales", "schedule", "total_iterations",
    "check_choice", "check_float", "check_weight", "check_weights", "default_within",
    "enum_choices", "flag_of", "layer_names", "markdown_table", "preview", "scale_sizes",
    "split_list", "tile_pixels",
]
