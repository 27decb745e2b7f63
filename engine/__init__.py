"""The in-process style-transfer engine: no gRPC, no server.

    from gramstyle.engine import StyleTransfer
    from gramstyle.options import StyleOptions

    engine = StyleTransfer(arch="vgg16", weights="path/to/vgg16.pth")
    result = engine.stylize(["content.png"], ["style.jpg"], StyleOptions(size=256))
    result.image.save("out.png")

Modules, one idea each: :mod:`~gramstyle.engine.transfer` (``StyleTransfer``, the public
entry point), :mod:`~gramstyle.engine.objective` (the loss as data: targets and terms),
:mod:`~gramstyle.engine.losses` (content, style, TV modules), :mod:`~gramstyle.engine.optimise`
and :mod:`~gramstyle.engine.lbfgs` (the optimisation loop), :mod:`~gramstyle.engine.extractor`
(the VGG feature network), :mod:`~gramstyle.engine.bands` (layers run in horizontal bands),
:mod:`~gramstyle.engine.stop` (cancellation checks), :mod:`~gramstyle.engine.tensors`
(PIL <-> tensor), :mod:`~gramstyle.engine.colour` (colour preservation, luminance-only
transfer, colour matching), :mod:`~gramstyle.engine.masks` (style region and source masks
brought to each layer: guided Gram matrices),
:mod:`~gramstyle.engine.precision` (fp32/bf16 choice), :mod:`~gramstyle.engine.target_cache`
(the byte-bounded LRU of style/content targets), :mod:`~gramstyle.engine.imagenet_weights`
(fetching and checking the ImageNet weights ahead of time).

This package never imports :mod:`gramstyle.server`. Names are imported lazily, so importing
a light submodule does not load torch.
"""

from importlib import import_module

_EXPORTS = {
    "Cancelled": "gramstyle.engine.stop",
    "StyleTransfer": "gramstyle.engine.transfer",
    "TargetCache": "gramstyle.engine.target_cache",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gramstyle.engine' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
