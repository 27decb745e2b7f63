"""``--style-mask -`` / ``--style-source-mask -``: a style without a mask, in-process, for
stylize, losses and batch; a file literally named ``-`` is given as ``./-``."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import noise
from PIL import Image

from gramstyle.cli import main

W, H = 64, 48
NET = ["--arch", "vgg19", "--weights", "random", "--device", "cpu"]
SMALL = ["--size", str(W), "--iterations", "2", *NET, "--quiet"]


@pytest.fixture
def files(tmp_path):
    """A content, two styles, a left-half region mask and an all-white mask."""
    paths = {name: tmp_path / f"{name}.png" for name in ("content", "sky", "sea", "left",
                                                         "white")}
    noise(W, H, 1).save(paths["content"])
    noise(W, H, 2).save(paths["sky"])
    Image.new("RGB", (W, H), (20, 60, 180)).save(paths["sea"])
    left = np.zeros((H, W), np.uint8)
    left[:, : W // 2] = 255
    Image.fromarray(left, "L").save(paths["left"])
    Image.new("L", (W, H), 255).save(paths["white"])
    return {name: str(path) for name, path in paths.items()}


def test_a_dash_skips_one_styles_mask(tmp_path, files, stylize_calls, capsys):
    out = tmp_path / "out.png"
    code = main(["stylize", "--content", files["content"],
                 "--style", files["sky"], "--style-mask", files["left"],
                 "--style", files["sea"], "--style-mask", "-",
                 "--style-source-mask", "-", "--style-source-mask", files["white"],
                 "-o", str(out), *SMALL])
    assert code == 0, capsys.readouterr().err
    (kwargs,) = stylize_calls
    assert kwargs["style_mask"] == [files["left"], None]
    assert kwargs["style_source_mask"] == [None, files["white"]]
    with Image.open(out) as image:
        assert image.size == (W, H)


def test_a_file_named_dash_is_given_as_dot_slash_dash(tmp_path, files, stylize_calls, capsys,
                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.open(files["left"]).save(tmp_path / "-", format="PNG")
    base = ["stylize", "--content", files["content"], "--style", files["sky"],
            "--style", files["sea"], *SMALL]
    assert main([*base, "--style-mask", "./-", "--style-mask", "-", "-o", "a.png"]) == 0, \
        capsys.readouterr().err
    # `-` skips even with a file of that name in the folder.
    assert stylize_calls[0]["style_mask"] == ["./-", None]
    # And ./- is read as that file: a corrupt one is an error naming the flag.
    (tmp_path / "-").write_bytes(b"not an image")
    assert main([*base, "--style-mask", "./-", "--style-mask", "-", "-o", "b.png"]) == 2
    assert "--style-mask #1: cannot decode image" in capsys.readouterr().err
    assert len(stylize_calls) == 1


def test_the_count_must_match_with_dashes_counted(tmp_path, files, stylize_calls, capsys):
    out = tmp_path / "out.png"
    code = main(["stylize", "--content", files["content"], "--style", files["sky"],
                 "--style", files["sea"], "--style-mask", "-", "--style-mask", files["left"],
                 "--style-mask", "-", "-o", str(out), *SMALL])
    assert code == 2
    assert ("--style-mask: expected 2 file(s), one per --style, in the same order; got 3; "
            "give '-' for a --style without one") in capsys.readouterr().err
    assert not stylize_calls and not out.exists()


def style_row(out: str) -> float:
    """The style term of `gramstyle losses`' table."""
    row = next(line for line in out.splitlines() if line.startswith("style "))
    return float(row.split()[1])


@pytest.mark.slow
def test_losses_with_a_dash_equal_an_all_white_mask(files, capsys):
    """No mask for a style is the same loss as an all-white mask for it (fp32: up to
    rounding), and not the loss without the other style's mask."""
    args = ["losses", files["content"], "--content", files["content"],
            "--style", files["sky"], "--style", files["sea"], *NET, "--precision", "fp32"]
    assert main([*args, "--style-mask", files["left"], "--style-mask", "-"]) == 0
    skipped = style_row(capsys.readouterr().out)
    assert main([*args, "--style-mask", files["left"], "--style-mask", files["white"]]) == 0
    white = style_row(capsys.readouterr().out)
    assert main(args) == 0
    plain = style_row(capsys.readouterr().out)
    assert skipped == pytest.approx(white, rel=1e-5)
    assert skipped != pytest.approx(plain, rel=1e-3)


@pytest.mark.slow
def test_batch_takes_a_dash(tmp_path, files, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for seed in (3, 4):
        noise(W, H, seed).save(folder / f"photo{seed}.png")
    out = tmp_path / "out"
    code = main(["batch", str(folder), "--output-dir", str(out),
                 "--style", files["sky"], "--style-mask", "-",
                 "--style", files["sea"], "--style-mask", files["left"], *SMALL])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["photo3.png", "photo4.png"]
    with Image.open(out / "photo3.png") as image:
        assert image.size == (W, H)


def test_help_documents_the_dash(capsys):
    with pytest.raises(SystemExit):
        main(["stylize", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "'-' for a style without one" in help_text
    assert "a file named '-': ./-" in help_text
