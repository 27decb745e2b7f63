"""The package boundaries: the engine runs without the server, the client library without
torch, the engine, the server or the CLI; the old engine path is a deprecated alias."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _imported_modules(folder: Path) -> dict[str, set[str]]:
    """``{file: modules its import statements name}`` for the .py files under ``folder``."""
    found = {}
    for path in sorted(folder.rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[str(path.relative_to(REPO))] = names
    return found


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _loaded_after(statement: str) -> list[str]:
    """The modules in sys.modules after running ``statement`` in a fresh interpreter."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("package,forbidden", [
    ("engine", ("gramstyle.server", "gramstyle.cli", "gramstyle.client", "grpc")),
    ("client", ("gramstyle.server", "gramstyle.engine", "gramstyle.cli", "gramstyle.kernels",
                "torch", "numpy")),
    ("kernels", ("gramstyle.server", "gramstyle.engine", "gramstyle.cli", "gramstyle.client")),
    ("src/gramstyle", ("gramstyle.server", "gramstyle.engine", "gramstyle.cli",
                       "gramstyle.client", "gramstyle.kernels", "torch")),
])
def test_no_package_imports_across_its_boundary(package, forbidden):
    """No import statement anywhere in the package names a forbidden package, even lazily."""
    crossing = {
        path: sorted(name for name in names
                     if _within(name, forbidden))
        for path, names in _imported_modules(REPO / package).items()
    }
    assert {path: names for path, names in crossing.items() if names} == {}


def test_engine_runs_without_loading_the_server():
    loaded = _loaded_after(
        "from gramstyle.engine import StyleTransfer\n"
        "from gramstyle.options import StyleOptions\n"
        "from PIL import Image\n"
        "image = Image.new('RGB', (32, 24), 'red')\n"
        "StyleTransfer(weights='random').stylize([image], [image], "
        "StyleOptions(size=32, iterations=1))")
    assert "gramstyle.engine.transfer" in loaded
    assert [m for m in loaded if _within(m, ("gramstyle.server", "gramstyle.cli", "grpc"))] == []


def test_client_library_loads_no_torch_engine_server_or_cli():
    loaded = _loaded_after("import gramstyle.client\nfrom gramstyle.client import Client, "
                           "AsyncClient, ServiceError, StyleOptions")
    assert "gramstyle.client.client" in loaded and "grpc" in loaded
    assert [m for m in loaded if _within(m, ("torch", "torchvision", "numpy", "gramstyle.engine",
                                             "gramstyle.server", "gramstyle.cli",
                                             "gramstyle.kernels"))] == []


def test_server_engine_names_are_deprecated_aliases():
    import gramstyle.engine
    import gramstyle.server

    with pytest.warns(DeprecationWarning, match=r"gramstyle\.server\.StyleTransfer is "
                      r"deprecated .* import it from gramstyle\.engine"):
        alias = gramstyle.server.StyleTransfer
    assert alias is gramstyle.engine.StyleTransfer
    with pytest.warns(DeprecationWarning, match="import it from gramstyle.engine"):
        assert gramstyle.server.Cancelled is gramstyle.engine.Cancelled
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from gramstyle.server import status  # noqa: F401  (a real submodule: no warning)
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        gramstyle.server.Nope  # noqa: B018


@pytest.mark.parametrize("folder", ["engine", "server", "src/gramstyle", "cli"])
def test_readme_layout_names_every_module(folder):
    """The README's Layout section has a line for every module of the engine, the server,
    the core and the CLI."""
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("\n## ", 1)]
    named = {name for cell in re.findall(r"`([^`]+)`", layout)
             for name in re.split(r"[,\s]+", cell)}
    modules = {p.stem for p in (REPO / folder).glob("*.py") if p.stem not in ("__init__",
                                                                              "__main__")}
    missing = sorted(m for m in modules if f"{m}.py" not in named and m not in named)
    assert missing == [], f"README Layout lacks {folder}/: {missing}"
