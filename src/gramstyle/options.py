"""The options of one style-transfer run, each declared once.

Every field of :class:`StyleOptions` carries an :class:`OptionSpec` in its dataclass
metadata: its kind, bounds, help text, CLI flag and which calls take it. Everything else is
derived from that declaration:

- validation (:meth:`StyleOptions.validated`), with errors that start with the option name
  and show the bad value, e.g. ``"iterations: must be between 1 and 10000, got 0"``;
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
from dataclasses import dataclass, field, fields
from typing import Any

from gramstyle.v1 import gramstyle_pb2 as pb

DEFAULT_CONTENT_LAYERS = ("relu4_2",)
DEFAULT_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")

#: Network choices (chosen when an engine or server starts, not per request).
POOLINGS = ("max", "avg")
ARCHS = ("vgg19", "vgg16")
DEVICES = ("auto", "cpu", "cuda")

#: Hard limits; the service may lower them.
MAX_SIZE = 2048
MAX_ITERATIONS = 10_000
MAX_SCALES = 8
#: Smallest long side of the coarsest scale.
MIN_SCALE_SIZE = 32

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
KINDS = ("int", "float", "bool", "choice", "layers", "layer_weights", "blend_weights")
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


def preview(value: Any, limit: int = PREVIEW_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters plus "… (N chars)" when longer.

    Every error message that echoes a caller's value goes through this, so a 17,000-character
    layer name cannot blow a status message past gRPC's metadata limit.
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    length = len(value) if isinstance(value, str) else len(text)
    return f"{text[:limit]}… ({length} chars)"


def check_weight(name: str, value: Any) -> float:
    """A loss or blend weight: finite and >= 0."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be a number, got {preview(value)}") from None
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
                         f"{preview(list(values))}")
    checked = tuple(check_weight(f"{name}[{i}]", v) for i, v in enumerate(values))
    if count and sum(checked) == 0:
        raise ValueError(f"{name}: at least one weight must be > 0, got "
                         f"{preview(list(checked))}")
    return checked


def layer_names(name: str, value: str | Sequence[str | int]) -> tuple[str, ...]:
    """Layer names as a tuple; a string is taken as a comma-separated list."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if value is None or not isinstance(value, Sequence):
        raise ValueError(f"{name}: expected a list of layer names, got {preview(value)}")
    return tuple(str(v).strip() for v in value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: must be one of {', '.join(choices)}, got {preview(value)}")
    return value


def scale_sizes(size: int, scales: int) -> list[int]:
    """Long sides of a coarse-to-fine pyramid: ``scales`` sizes growing by sqrt(2) to ``size``.

    >>> scale_sizes(512, 3)
    [256, 362, 512]
    """
    return [round(size / math.sqrt(2) ** (scales - 1 - k)) for k in range(scales)]


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
                raise ValueError(f"{name}: must be an integer >= {spec.low:g}, got "
                                 f"{preview(value)}")
            text = spec.range_error or "must be an integer between {low} and {high}{unit}, " \
                                       "got {value}"
            unit = f" {spec.unit}" if spec.unit else ""
            raise ValueError(f"{name}: " + text.format(low=f"{spec.low:g}", high=f"{high:g}",
                                                       unit=unit, value=value))
        return value
    if spec.kind == "float":
        value = check_weight(name, value) if spec.low == 0 else float(value)
        if spec.low_exclusive and value <= spec.low:
            raise ValueError(f"{name}: must be > {spec.low:g}, got {value}")
        return value
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name}: must be true or false, got {preview(value)}")
        return value
    if spec.kind == "choice":
        return check_choice(name, value, spec.choices)
    if spec.kind == "layers":
        return layer_names(name, value)
    return value  # weights: checked against their count in validated() / by the engine


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
        low=0)
    style_weight: float = option(
        5.0, "float", "beta, the style loss weight; 0 = feature inversion", scope="losses",
        low=0)
    tv_weight: float = option(
        0.0, "float", "total-variation (smoothness) loss weight", scope="losses", low=0)
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
        low=0, metavar="REL")
    learning_rate: float | None = option(
        None, "float", "step size (default: 1.0 for lbfgs, 0.02 for adam, in [0,1] pixels)",
        low=0, low_exclusive=True, optional=True, flag="--lr")
    seed: int = option(0, "int", "seed of the noise start image (64-bit); same seed and inputs "
                       "give the same output on one machine", low=-(2**63),
                       high=2**63 - 1, range_error="must be a 64-bit integer, got {value}")
    size: int = option(512, "int", "output long side in pixels (16 to 2048); the short side must "
                       "reach the deepest layer (16 px for relu5_1)", low=16, high="max_size",
                       unit="pixels")
    style_scale: float = option(
        1.0, "float", "style images are resized to long side size * style_scale",
        scope="losses", low=0)
    scales: int = option(
        1, "int", "coarse-to-fine: optimise at this many sizes growing by sqrt(2) up to size, "
        "each for `iterations` steps from the previous result", low=1, high=MAX_SCALES)
    preserve_colors: bool = option(
        False, "bool", "keep the content image's colours: transfer luminance only (YIQ)")
    precision: str = option(
        "auto", "choice", "auto: bf16 where the hardware runs it natively (CUDA with bf16, x86 "
        "CPUs with AVX512-BF16 or AMX), else fp32; fp32; or bf16 autocast for the network "
        "(losses and pixels stay fp32). Results report the precision used",
        scope="losses", enum=pb.Precision)
    tile_size: int = option(
        0, "int", "compute the loss and its gradient over tiles of about this many pixels a "
        "side (rounded down to a multiple of the network's stride), each with a halo that "
        "keeps them exact: the network's memory is bounded by the tile, not the image "
        "(docs/tiling.md); 0 = off, the whole image at once", scope="losses", low=0,
        high="max_size", unit="pixels", metavar="PX")
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

    def validated(self, max_size: int = MAX_SIZE, max_iterations: int = MAX_ITERATIONS
                  ) -> StyleOptions:
        """Check every field; return self. Raises ValueError naming the field and value."""
        limits = {"max_size": max_size, "max_iterations": max_iterations}
        for name, spec, _ in self.specs():
            setattr(self, name, check_value(name, spec, getattr(self, name), limits))
        if not self.content_layers and not self.style_layers:
            raise ValueError("content_layers/style_layers: at least one layer is needed")
        for name, spec, _ in self.specs():
            if spec.kind == "layer_weights":
                layers = getattr(self, spec.of)
                setattr(self, name, check_weights(name, getattr(self, name), len(layers))
                        if layers else ())
        if self.style_scale == 0 or self.size * self.style_scale > max_size:
            raise ValueError(f"style_scale: must be > 0 and keep size*style_scale <= {max_size}, "
                             f"got {self.style_scale}")
        if self.scales > 1 and scale_sizes(self.size, self.scales)[0] < MIN_SCALE_SIZE:
            raise ValueError(f"scales: {self.scales} scales from size {self.size} would start "
                             f"below {MIN_SCALE_SIZE} px; use fewer scales or a larger size")
        if self.iterations * self.scales > max_iterations:
            raise ValueError(f"iterations: iterations*scales must be at most {max_iterations}, "
                             f"got {self.iterations}*{self.scales}")
        return self


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
    "ARCHS", "CONVERGENCE_CHECK_EVERY", "CONVERGENCE_WINDOW", "DEFAULT_CONTENT_LAYERS",
    "DEFAULT_TOLERANCE", "DEFAULT_STYLE_LAYERS", "DEVICES", "MAX_ITERATIONS",
    "MAX_SCALES", "MAX_SIZE", "MIN_SCALE_SIZE", "POOLINGS", "OptionSpec", "StyleOptions",
    "check_choice", "check_weight", "check_weights", "enum_choices", "flag_of",
    "layer_names", "markdown_table", "preview", "scale_sizes",
]
