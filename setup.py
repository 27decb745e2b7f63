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
    """The fused Gram/style-loss extension ``gramstyle.kernels._C``, as (ext_modules, cmdclass).

    * torch not importable at build time (a client-only install, or an isolated build
      without ``--no-build-isolation``): no extension; ``gramstyle.kernels`` then runs its
      einsum fallback.
    * torch importable: the C++ CPU kernels are always built.
    * The CUDA kernels are added when a CUDA toolkit is found and either a GPU is visible
      to torch or ``FORCE_CUDA=1`` (to compile them on a machine without a GPU, as CI
      does); ``FORCE_CUDA=0`` skips them even with a GPU.

    Variables: ``CUDA_HOME`` (the toolkit root, e.g. /usr/local/cuda -- found on its own
    when unset), ``TORCH_CUDA_ARCH_LIST`` (defaults to "9.0" when no GPU is visible, so a
    forced build compiles one architecture), ``FORCE_CUDA``. See docs/kernels.md.
    """
    import glob
    import shutil

    try:
        import torch
    except ImportError:
        print("gramstyle: torch is not importable; building without gramstyle.kernels._C")
        return [], {}

    def toolkit_root() -> str | None:
        # torch guesses CUDA_HOME from `which nvcc`; here that is a wrapper script in
        # /usr/local/bin, which would make it /usr/local. Accept only a real toolkit.
        def is_toolkit(path: str | None) -> bool:
            return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))

        for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
            if is_toolkit(candidate):
                return candidate
        nvcc = shutil.which("nvcc")
        if nvcc:
            guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
            if is_toolkit(guess):
                return guess
        for guess in ("/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
            if is_toolkit(guess):
                return guess
        return None

    force = os.environ.get("FORCE_CUDA", "").strip()
    cuda_home = toolkit_root() if torch.version.cuda else None
    gpu = torch.version.cuda is not None and torch.cuda.is_available()
    with_cuda = cuda_home is not None and force != "0" and (gpu or force == "1")
    if force == "1" and not with_cuda:
        raise RuntimeError(
            "FORCE_CUDA=1 but no CUDA build of torch or no CUDA toolkit was found "
            "(set CUDA_HOME to the toolkit root, e.g. /usr/local/cuda)"
        )
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension on import
        if not gpu:
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = ["kernels/csrc/gram.cpp"]
    cxx_flags = ["-O3"]
    if not with_cuda:
        ext = CppExtension("gramstyle.kernels._C", sources, extra_compile_args={"cxx": cxx_flags})
    else:
        # The toolkit ships no cuBLAS/cuSPARSE headers here; torch's `nvidia` wheels do.
        # -idirafter: searched last, so the toolkit's own CUDA runtime headers win.
        site = os.path.dirname(os.path.dirname(torch.__file__))
        extra = [
            d
            for d in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
            + sorted(glob.glob(os.path.join(site, "nvidia", "*", "*", "include")))
            if os.path.isfile(os.path.join(d, "cublas_v2.h"))
            or os.path.isfile(os.path.join(d, "cusparse.h"))
        ]
        after = [f"-idirafter{d}" for d in extra]
        ext = CUDAExtension(
            "gramstyle.kernels._C",
            [*sources, "kernels/csrc/cuda/gram_cuda.cu"],
            define_macros=[("GRAMSTYLE_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": [*cxx_flags, *after],
                "nvcc": ["-O3", *(f"-Xcompiler={a}" for a in after)],
            },
        )
    print(f"gramstyle: building gramstyle.kernels._C ({'CPU + CUDA' if with_cuda else 'CPU'})")
    return [ext], {"build_ext": BuildExtension}


generate_proto()
ext_modules, cmdclass = kernel_extensions()

setup(
    name="gramstyle",
    version="0.1.0",
    description="Gatys neural style transfer as a gRPC service, with a fused Gram kernel",
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
