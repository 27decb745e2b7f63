"""The error messages the docs quote are the ones the code gives: each quote is produced
here by the code, and must appear in its page word for word."""

from __future__ import annotations

from pathlib import Path

import pytest

from gramstyle.images import load_image
from gramstyle.options import StyleOptions

REPO = Path(__file__).resolve().parents[2]


def message(call) -> str:
    with pytest.raises(ValueError) as caught:
        call()
    return str(caught.value)


def test_service_md_quotes_the_bad_image_message():
    # docs/service.md sends b"not an image" (base64 bm90IGFuIGltYWdl) as content[0].
    quoted = message(lambda: load_image(b"not an image", "content[0]"))
    assert quoted == ("content[0]: cannot decode image (12 bytes): not a PNG, JPEG, WebP, BMP, "
                      "TIFF or GIF image")
    text = (REPO / "docs" / "service.md").read_text()
    assert f'"message": "{quoted}"' in text
    assert "bm90IGFuIGltYWdl" in text


def test_readme_quotes_the_option_and_file_messages(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    readme = (REPO / "README.md").read_text()
    for quoted in (message(lambda: load_image("x.png", "content[0]")),
                   message(lambda: StyleOptions(iterations=0).validated())):
        assert f"`{quoted}`" in readme, quoted


def test_readme_quotes_the_cli_image_message(images, tmp_path, capsys):
    from gramstyle.cli import EXIT_USAGE, main

    truncated = tmp_path / "s.png"
    truncated.write_bytes(images["cat"].read_bytes()[:3000])
    code = main(["stylize", "--content", str(images["cat"]), "--style", str(images["starry"]),
                 "--style", str(truncated), "--weights", "random", "-q",
                 "-o", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    # The README quotes the start of the line; the rest names the file and Pillow's reason.
    quoted = "gramstyle: error: --style #2: corrupt or truncated image"
    assert err.startswith(f"{quoted} ('{truncated}'): ")
    assert f"`{quoted}`" in (REPO / "README.md").read_text()
