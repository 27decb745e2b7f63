"""Without the server extra (a client-only install), the commands that need torch say how a
source checkout installs it -- gramstyle is not on a package registry."""

from __future__ import annotations

import sys

import pytest

from gramstyle.cli import EXIT_FAILURE, main

INSTALL = ("pip install -r requirements-build.txt && pip install --no-build-isolation "
           "'.[server]' in the source checkout")


@pytest.mark.parametrize("argv, module, what", [
    (["serve", "--weights", "random"], "gramstyle.server.serve", "serve"),
    (["stylize", "--content", "{cat}", "--style-weight", "0", "-q", "-o", "{out}"],
     "gramstyle.engine.transfer", "running in-process"),
    (["weights", "fetch"], "gramstyle.engine.imagenet_weights", "weights fetch"),
])
def test_missing_server_extra_names_the_source_install(argv, module, what, monkeypatch, capsys,
                                                       images, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    argv = [a.format(cat=images["cat"], out=tmp_path / "out.png") for a in argv]
    assert main(argv) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert err.startswith(f"gramstyle: error: {what} needs the server extra ({INSTALL}): ")
    assert "gramstyle[server]" not in err
