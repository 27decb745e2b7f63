"""The style-transfer engine and the gRPC service around it.

Use the engine directly, without gRPC::

    from gramstyle.server import StyleTransfer, StyleOptions
    engine = StyleTransfer(arch="vgg16", weights="path/to/vgg16.pth")
    result = engine.stylize(["content.png"], ["style.jpg"], StyleOptions(size=256))
    result.image.save("out.png")

The options and result types live in the torch-free :mod:`gramstyle.options` and
:mod:`gramstyle.results` and are re-exported here for convenience. The names are imported
lazily, so importing a light submodule of ``gramstyle.server`` does not load torch.
"""

from importlib import import_module

_EXPORTS = {
    "Cancelled": "gramstyle.server.engine",
    "StyleTransfer": "gramstyle.server.engine",
    "StyleOptions": "gramstyle.options",
    "LossReport": "gramstyle.results",
    "Losses": "gramstyle.results",
    "Progress": "gramstyle.results",
    "StylizeResult": "gramstyle.results",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gramstyle.server' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
