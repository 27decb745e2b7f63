"""gramstyle: Gatys-style neural style transfer as a gRPC service.

Subpackages:

- ``gramstyle.engine``  -- the in-process style-transfer engine (torch), no gRPC;
- ``gramstyle.server``  -- the gRPC service around the engine;
- ``gramstyle.kernels`` -- the Gram-matrix / style-loss op (fused C++/CUDA, einsum fallback);
- ``gramstyle.client``  -- the torch-free client library;
- ``gramstyle.cli``     -- the ``gramstyle`` command line (in-process, remote, serve);
- ``gramstyle.options``, ``results``, ``images``, ``codec`` -- the torch-free core that all of
  the above share (options, result types, image decoding/validation, proto conversion);
- ``gramstyle.v1``      -- protobuf/gRPC stubs generated from ``proto/`` at build time.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gramstyle")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
