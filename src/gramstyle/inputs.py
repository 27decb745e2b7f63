"""The image inputs of the requests, each declared once.

Every image a call can carry is an :class:`ImageInput` in :data:`INPUTS`: which calls take
it, how it travels (its proto field), whether the server counts it toward ``--max-images``
and reads its header before admitting the request, how it enters the memory estimate, its
CLI flag, and the field name its errors start with. Everything else is derived from it:

- the codec's request building and reading (:mod:`gramstyle.codec`: the keyword argument of
  the request builders, the proto field, the per-input checks);
- the service's image count and header probing (:mod:`gramstyle.server.service`);
- the memory estimate's image terms (:mod:`gramstyle.server.memory`);
- the CLI's image flags and file checks (:mod:`gramstyle.cli.flags`).

Adding an image input means: declare it here, add its proto field(s) to the request
messages of its calls, and use it in the engine (the keyword argument of
``StyleTransfer.stylize`` / ``compute_losses`` has the input's name). A test checks that the
table and the proto agree.

The sizes an input is used at (:func:`output_size`, :func:`style_side`,
:func:`resized_size`) live here too, so that the engine and the server's memory estimate
(which must not need torch for it) compute them one way. This module is torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gramstyle.images import long_side_size

#: The calls that take images (the RPC names of gramstyle.v1.StyleTransferService).
RPCS = ("Stylize", "ComputeLosses")

#: The command-line spelling of a skipped entry of a :attr:`ImageInput.skippable` input
#: (``--style-mask -``: this style has no mask); a file of that name is given as ``./-``.
SKIP = "-"

#: How an input enters the memory estimate. Every input costs its encoded bytes and its
#: decoded pixels, held for the whole run; beyond that:
MEMORY = {
    "own": "decoded at its own size only (resized, it is the image optimised or scored)",
    "output": "decoded, and resized to the output size: a float copy kept for the run",
    "style": "decoded, and resized to its style size (long side: the output's times "
             "style_scale): a float copy kept for the run",
}


@dataclass(frozen=True)
class ImageInput:
    """Everything any layer needs to know about one image input (see the module doc)."""

    #: The keyword argument (client, codec, engine), the CLI's ``dest`` and, by default, the
    #: proto field; errors start with it (``content[0]: ...``, ``init_image: ...``).
    name: str
    #: The CLI help text.
    help: str
    #: The calls that take it (see :data:`RPCS`).
    rpcs: tuple[str, ...]
    #: Several images (a list, ``--flag`` repeated) or at most one.
    repeated: bool
    #: The CLI flag ("--content"); a name without dashes is a positional argument.
    flag: str
    metavar: str = "IMAGE"
    #: The request field; default: :attr:`name`.
    proto: str | None = None
    #: When the request field holds messages (WeightedImage), the field of each that holds
    #: the encoded bytes; None: the request field itself is ``bytes``.
    part: str | None = None
    #: Counts toward the server's ``--max-images`` (checked before anything is decoded).
    counts: bool = True
    #: Its header is read before admission (allowed format, pixel limit; the memory
    #: estimate's sizes).
    probed: bool = True
    #: How it enters the memory estimate: a key of :data:`MEMORY`.
    memory: str = "own"
    #: Channels of its tensor when resized (3: RGB; 1: a greyscale mask).
    channels: int = 3
    #: The call needs it (a single input): when it is missing, the empty image is refused
    #: like any other bad image (``candidate: empty image``).
    required: bool = False
    #: Its size is the output's (the ComputeLosses candidate): its long side is checked
    #: against the server's ``max_size`` from its header, and it is checked first.
    sets_size: bool = False
    #: One image per image of that input, in the same order (a per-style mask: "style").
    paired_with: str | None = None
    #: An entry may be left out for one image of its pair (a style without a mask): None in
    #: Python, an empty ``bytes`` entry on the wire, :data:`SKIP` on the command line. A
    #: skipped entry still counts toward the pairing, but is no image: it is not counted
    #: toward ``--max-images``, not probed and not in the memory estimate.
    skippable: bool = False
    #: ``(option, value)``: the input may only be given when the option is unset or has this
    #: value (init_image needs init 'image').
    only_with: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        assert set(self.rpcs) <= set(RPCS) and self.memory in MEMORY, self
        assert not self.skippable or (self.repeated and self.paired_with), self

    @property
    def field(self) -> str:
        """The request field that carries it."""
        return self.proto or self.name

    def error_field(self, index: int | None = None) -> str:
        """The name its errors start with: ``content[1]`` (repeated) or ``init_image``."""
        return f"{self.name}[{index}]" if self.repeated else self.name


#: The image inputs, in the order the server lists them (``--max-images`` messages).
INPUTS: tuple[ImageInput, ...] = (
    ImageInput("content", "content image (repeat for several targets)",
               ("Stylize", "ComputeLosses"), repeated=True, flag="--content", part="data",
               memory="output"),
    ImageInput("style", "style image (repeat to blend several styles)",
               ("Stylize", "ComputeLosses"), repeated=True, flag="--style", part="data",
               memory="style"),
    # Greyscale masks, one per style (guided Gram matrices, gramstyle.engine.masks).
    ImageInput("style_mask", "region mask of a --style on the output: white where that style "
               "applies, black where not (give one per --style, in the same order; '-' for a "
               "style without one, which applies everywhere; a file named '-': ./-)",
               ("Stylize", "ComputeLosses"), repeated=True, flag="--style-mask",
               metavar="MASK", memory="output", channels=1, paired_with="style",
               skippable=True),
    ImageInput("style_source_mask", "source mask of a --style on its own image: the part its "
               "statistics are taken from (one per --style, in the same order; '-' for a "
               "style without one)",
               ("Stylize", "ComputeLosses"), repeated=True, flag="--style-source-mask",
               metavar="MASK", memory="style", channels=1, paired_with="style",
               skippable=True),
    # Resized to the output size, it *is* the first scale's optimised image.
    ImageInput("init_image", "start image for --init image", ("Stylize",), repeated=False,
               flag="--init-image", only_with=("init", "image")),
    ImageInput("candidate", "the image to score", ("ComputeLosses",), repeated=False,
               flag="candidate", metavar="CANDIDATE", required=True, sets_size=True),
)
_BY_NAME = {entry.name: entry for entry in INPUTS}


def skipped(entry: ImageInput, data: object) -> bool:
    """Whether an entry of ``entry`` is a skipped one (:attr:`ImageInput.skippable`): None,
    or empty bytes as it travels. For any other input nothing is skipped (an empty image is
    refused as such)."""
    return entry.skippable and (data is None or (
        isinstance(data, (bytes, bytearray, memoryview)) and not len(data)))


def input_named(name: str) -> ImageInput:
    return _BY_NAME[name]


def inputs_of(rpc: str) -> tuple[ImageInput, ...]:
    """The inputs ``rpc`` takes, in :data:`INPUTS` order."""
    return tuple(entry for entry in INPUTS if rpc in entry.rpcs)


def check_order(rpc: str) -> tuple[ImageInput, ...]:
    """The inputs of ``rpc`` in the order they are checked: the one that sets the output
    size first (the other checks depend on it), then the rest in :data:`INPUTS` order."""
    return tuple(sorted(inputs_of(rpc), key=lambda entry: not entry.sets_size))


# ---------------------------------------------------------------------------- sizes

class Sized(Protocol):
    """Anything with a size in pixels: a PIL image, an ImageHeader."""

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...


def output_size(contents: Sequence[Sized], styles: Sequence[Sized], side: int
                ) -> tuple[int, int]:
    """The output (width, height) of a Stylize at long side ``side``: the first content
    image's aspect ratio, else the first style image's, else square."""
    first = contents[0] if contents else styles[0] if styles else None
    if first is None:
        return side, side
    return long_side_size(first.width, first.height, side)


def style_side(width: int, height: int, style_scale: float) -> int:
    """Long side (px) the style images are resized to for a ``width`` x ``height`` output."""
    return max(16, round(max(width, height) * style_scale))


def resized_size(entry: ImageInput, image: Sized, output: tuple[int, int],
                 style_scale: float) -> tuple[int, int] | None:
    """The (width, height) ``entry``'s ``image`` is resized to for an output of size
    ``output`` (see :data:`MEMORY`), or None when it is not resized."""
    if entry.memory == "output":
        return output
    if entry.memory == "style":
        return long_side_size(image.width, image.height, style_side(*output, style_scale))
    return None


def markdown_table() -> str:
    """The image-input table of docs/options.md, generated from the declarations."""
    rows = ["| input | CLI flag | request field | calls | counts toward `--max-images` | "
            "header read before admission | memory estimate | meaning |",
            "|---|---|---|---|---|---|---|---|"]
    for entry in INPUTS:
        flag = f"`{entry.flag} {entry.metavar}`" if entry.flag.startswith("-") \
            else f"`{entry.metavar}` (positional)"
        flag += " (repeat)" if entry.repeated else ""
        field = entry.field + ("[]" if entry.repeated else "") + (
            f".{entry.part}" if entry.part else "")
        paired = f"; one per `{entry.paired_with}` image" if entry.paired_with else ""
        if entry.skippable:
            paired += " (an empty entry: none for that image)"
        rows.append(
            f"| `{entry.name}` | {flag} | `{field}` | {', '.join(entry.rpcs)} | "
            f"{'yes' if entry.counts else 'no'} | {'yes' if entry.probed else 'no'} | "
            f"{MEMORY[entry.memory]} | {entry.help}{paired} |")
    return "\n".join(rows)


__all__ = ["INPUTS", "MEMORY", "RPCS", "SKIP", "ImageInput", "Sized", "check_order",
           "input_named", "inputs_of", "markdown_table", "output_size", "resized_size",
           "skipped", "style_side"]
