"""The CLI names flags from an error's ``.field`` (never from its message), and `info
--server` shows what an unset size/iterations gets on a server with lower limits."""

from __future__ import annotations

import pytest

from gramstyle.cli.flags import flag_for, flag_message
from gramstyle.cli.report import format_server_info
from gramstyle.errors import FieldError, FieldWarning, ImageError
from gramstyle.results import ModelInfo, ServerInfo


@pytest.mark.parametrize(("field", "flag"), [
    ("content_weight", "--content-weight"),
    ("learning_rate", "--lr"),
    ("style_blend_weights", "--style-weights"),
    ("style_blend_weights[2]", "--style-weights #3"),
    ("content[0]", "--content #1"),
    ("style[11]", "--style #12"),
    ("content_layer_weights[1]", "--content-layer-weights #2"),
    ("progress_sheet", "--progress-sheet"),
    ("tls_ca", "--tls-ca"),
    ("content/style", None),
    ("content_layers/style_layers", None),
    ("style[x]", None),
    ("Weights", None),
])
def test_flag_for(field, flag):
    assert flag_for(field) == flag


def test_flag_message_reads_the_field_not_the_text():
    assert flag_message(ImageError("style[1]", "file not found: 'x.png'")) == \
        "--style #2: file not found: 'x.png'"
    assert flag_message(FieldWarning("token", "sent in plaintext")) == \
        "--token: sent in plaintext"
    # Fields with no single flag keep the message as it is.
    assert flag_message(FieldError("content/style", "give at least one content or style "
                                   "image")) == "content/style: give at least one content or " \
                                                "style image"


def _info(**limits) -> ServerInfo:
    base = {"max_pixels": 4096 * 4096, "max_size": 2048, "max_iterations": 10_000,
            "max_message_bytes": 64 * 2**20, "workers": 1, "queue_size": 4, "max_images": 8,
            "max_request_memory_bytes": 0, "memory_budget_bytes": 0, "default_size": 512,
            "default_iterations": 300}
    return ServerInfo(version="1", models=[ModelInfo("vgg19", "random", "max", ["conv1_1"],
                                                     True)],
                      backend="cpu", device="cpu", limits={**base, **limits}, busy_workers=0,
                      queued=0)


def test_info_shows_lowered_defaults_only_when_lowered():
    text = format_server_info(_info(max_size=128, max_iterations=50, default_size=128,
                                    default_iterations=50), "host:1")
    assert "defaults  unset size 128 px, unset iterations 50 (the server's limits are below " \
           "512 px / 300)" in text
    assert "defaults" not in format_server_info(_info(), "host:1")
    # An older server sends no defaults (0): nothing is claimed.
    assert "defaults" not in format_server_info(_info(default_size=0, default_iterations=0),
                                                "host:1")


def test_in_process_options_are_checked_once(images, tmp_path, monkeypatch, capsys):
    """The CLI validates the options it was given once, before any model loads; the engine
    then checks only the layer names against its network."""
    import gramstyle.options as options_module
    from gramstyle.cli import main
    from gramstyle.options import StyleOptions

    checked: list[str] = []
    real = options_module.check_value
    monkeypatch.setattr(options_module, "check_value",
                        lambda name, *args: (checked.append(name), real(name, *args))[1])
    out = tmp_path / "out.png"
    code = main(["stylize", "--content", str(images["cat"]), "--style", str(images["starry"]),
                 "-o", str(out), "--weights", "random", "--size", "32", "--iterations", "2",
                 "-q"])
    assert code == 0, capsys.readouterr().err
    assert out.exists()
    assert sorted(checked) == sorted(name for name, _, _ in StyleOptions.specs())
