"""Build script for gramstyle: the parts of the build that pyproject.toml cannot express.

The static metadata (name, version, extras, scripts, licence) and the package-dir mapping of
``src/gramstyle``, ``server/``, ``kernels/`` and ``client/`` onto the one import package
``gramstyle`` are in pyproject.toml. Here:

1. The gRPC/protobuf Python code is generated from ``proto/`` with grpcio-tools into
   ``src/gramstyle/v1`` (git-ignored; never edited by hand).
2. The packages: every folder with an ``__init__.py`` under the mapped folders, so that a
   new subpackage (e.g. ``cli/``) is installed without editing a list.
3. The fused Gram/style-loss operator (``gramstyle.kernels._C``) is compiled when torch is
   importable at build time -- see ``kernel_extensions`` below and the README's "Build" section.
4. The install requirements (dynamic in pyproject.toml): grpcio and protobuf floors taken
   from the generated stubs, and -- in a wheel with the compiled operator -- the exact torch
   it was compiled against.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import find_packages, setup

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


def mapped_packages() -> list[str]:
    """The packages: each mapped root of [tool.setuptools] package-dir and its subpackages."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: setuptools (imported above) vendors tomli
        import tomli as tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        package_dir = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    packages = set()
    for name, folder in package_dir.items():
        packages.add(name)
        packages.update(f"{name}.{sub}" for sub in find_packages(str(ROOT / folder)))
    return sorted(packages)


def stub_requirements() -> list[str]:
    """grpcio and protobuf floors that the generated stubs themselves check on import.

    The gRPC stubs refuse a grpcio older than the grpcio-tools that generated them
    (GRPC_GENERATED_VERSION) and the protobuf code refuses a protobuf runtime older than the
    protoc inside grpcio-tools (ValidateProtobufRuntimeVersion). Reading the floors from the
    stubs keeps them true even for a --no-build-isolation build with another grpcio-tools
    than the pinned one. With the grpcio-tools==1.72.2 of pyproject.toml [build-system]:
    grpcio>=1.72.2, protobuf>=6.30.0.
    """
    import re

    out = GENERATED_DIR / "gramstyle" / "v1"
    grpc_code = (out / "gramstyle_pb2_grpc.py").read_text()
    pb2_code = (out / "gramstyle_pb2.py").read_text()
    grpc_floor = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", grpc_code, re.M)
    pb_floor = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,"
        r"\s*(\d+),\s*(\d+),\s*(\d+),\s*'([^']*)'",
        pb2_code,
    )
    if not grpc_floor or not pb_floor:
        raise RuntimeError(
            "the generated stubs carry no grpcio/protobuf version check; build with the "
            "grpcio-tools pinned in pyproject.toml [build-system] (see requirements-build.txt)"
        )
    protobuf = ".".join(pb_floor.group(1, 2, 3)) + pb_floor.group(4).replace("-", "")
    return [f"grpcio>={grpc_floor.group(1)}", f"protobuf>={protobuf}"]


def torch_requirement(ext_modules: list) -> list[str]:
    """``torch==X.Y.Z`` for a wheel that holds the compiled operator, else nothing.

    The operator links against torch's C++ ABI, which changes between releases, so -- as
    torchvision does -- such a wheel must only be installed next to the torch it was built
    with. As there, the local version (``+cpu``, ``+cu130``) is dropped: it names the build
    variant of one release, and pinning it would refuse the same release from another index.
    A client-only build has no operator and needs no torch.
    """
    if not ext_modules:
        return []
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}"]


generate_proto()
ext_modules, cmdclass = kernel_extensions()

# The install requirements (pyproject.toml [project] `dependencies`, which is declared dynamic
# there because of the torch pin). This is the one place for them; the extras are static and
# stay in pyproject.toml. The client-only install: no torch.
install_requires = [
    *stub_requirements(),
    # The richer error model: google.rpc.BadRequest details on statuses (server and client).
    # Same release as the pinned grpcio-tools, so its floors are no higher than the stubs'.
    "grpcio-status>=1.72.2",
    "pillow>=10",
    "tqdm>=4.60",
    *torch_requirement(ext_modules),
]

setup(
    packages=mapped_packages(),
    install_requires=install_requires,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
