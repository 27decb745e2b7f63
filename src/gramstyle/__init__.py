"""gramstyle: Gatys-style neural style transfer as a gRPC service.

Subpackages:

- ``gramstyle.server``  -- the style-transfer engine (torch) and the gRPC service around it;
- ``gramstyle.kernels`` -- the Gram-matrix / style-loss op (fused C++/CUDA, einsum fallback);
- ``gramstyle.client``  -- the torch-free client library and the ``gramstyle`` CLI;
- ``gramstyle.images``  -- image decoding, validation and encoding shared by all of the above;
- ``gramstyle.v1``      -- protobuf/gRPC stubs generated from ``proto/`` at build time.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gramstyle")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
