"""The style-transfer engine and the gRPC service around it.

Use the engine directly, without gRPC::

    from gramstyle.server import StyleTransfer, StyleOptions
    engine = StyleTransfer(arch="vgg16", weights="path/to/vgg16.pth")
    result = engine.stylize(["content.png"], ["style.jpg"], StyleOptions(size=256))
    result.image.save("out.png")

The names below are imported lazily, so ``gramstyle.server.options`` stays importable (and
torch-free) in a client-only install.
"""

from importlib import import_module

_EXPORTS = {
    "Cancelled": "engine",
    "LossReport": "engine",
    "Losses": "engine",
    "Progress": "engine",
    "StyleTransfer": "engine",
    "StylizeResult": "engine",
    "StyleOptions": "options",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"gramstyle.server.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'gramstyle.server' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
