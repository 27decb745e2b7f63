"""The style-transfer engine and the gRPC service around it.

Use the engine directly, without gRPC::

    from gramstyle.server import StyleTransfer, StyleOptions
    engine = StyleTransfer(arch="vgg16", weights="path/to/vgg16.pth")
    result = engine.stylize(["content.png"], ["style.jpg"], StyleOptions(size=256))
    result.image.save("out.png")
"""

from gramstyle.server.engine import (
    Cancelled,
    Losses,
    LossReport,
    Progress,
    StyleTransfer,
    StylizeResult,
)
from gramstyle.server.options import StyleOptions

__all__ = [
    "Cancelled",
    "LossReport",
    "Losses",
    "Progress",
    "StyleOptions",
    "StyleTransfer",
    "StylizeResult",
]
