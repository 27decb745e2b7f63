"""The CLI's --style-mask / --style-source-mask (one per --style, same order) and --colour,
in-process (issue 20)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import noise
from PIL import Image

from gramstyle.cli import main

W, H = 64, 48
SMALL = ["--size", str(W), "--iterations", "2", "--arch", "vgg19", "--weights", "random",
         "--device", "cpu", "--quiet"]


@pytest.fixture
def files(tmp_path):
    """A content, two styles and two complementary region masks (left / right half)."""
    paths = {name: tmp_path / f"{name}.png" for name in ("content", "sky", "sea", "sky_mask",
                                                         "sea_mask")}
    noise(W, H, 1).save(paths["content"])
    noise(W, H, 2).save(paths["sky"])
    Image.new("RGB", (W, H), (20, 60, 180)).save(paths["sea"])
    left = np.zeros((H, W), np.uint8)
    left[:, : W // 2] = 255
    Image.fromarray(left, "L").save(paths["sky_mask"])
    Image.fromarray(255 - left, "L").save(paths["sea_mask"])
    return {name: str(path) for name, path in paths.items()}


def test_style_masks_reach_the_engine_in_order(tmp_path, files, stylize_calls, capsys):
    out = tmp_path / "out.png"
    code = main(["stylize", "--content", files["content"],
                 "--style", files["sky"], "--style-mask", files["sky_mask"],
                 "--style", files["sea"], "--style-mask", files["sea_mask"],
                 "--style-source-mask", files["sea_mask"],
                 "--style-source-mask", files["sky_mask"],
                 "-o", str(out), *SMALL])
    assert code == 0, capsys.readouterr().err
    (kwargs,) = stylize_calls
    assert kwargs["style"] == [files["sky"], files["sea"]]
    assert kwargs["style_mask"] == [files["sky_mask"], files["sea_mask"]]
    assert kwargs["style_source_mask"] == [files["sea_mask"], files["sky_mask"]]
    with Image.open(out) as image:
        assert image.size == (W, H)


@pytest.mark.parametrize("extra, message", [
    (["--style-mask", "{sky_mask}"],
     "--style-mask: expected 2 file(s), one per --style, in the same order; got 1"),
    (["--style-source-mask", "{sky_mask}", "--style-source-mask", "{sea_mask}",
      "--style-source-mask", "{sea_mask}"],
     "--style-source-mask: expected 2 file(s), one per --style, in the same order; got 3"),
    (["--style-mask", "{sky_mask}", "--style-mask", "{corrupt}"],
     "--style-mask #2: cannot decode image"),
])
def test_bad_masks_exit_2_naming_the_flag_before_any_run(tmp_path, files, stylize_calls, capsys,
                                                         extra, message):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image at all")
    out = tmp_path / "out.png"
    extra = [a.format(corrupt=corrupt, **files) for a in extra]
    code = main(["stylize", "--content", files["content"], "--style", files["sky"],
                 "--style", files["sea"], *extra, "-o", str(out), *SMALL])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert not stylize_calls and not out.exists()


def test_losses_take_the_masks(files, capsys):
    args = ["losses", files["content"], "--content", files["content"],
            "--style", files["sky"], "--style", files["sea"], "--arch", "vgg19",
            "--weights", "random", "--device", "cpu"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--style-mask", files["sky_mask"], "--style-mask",
                 files["sea_mask"]]) == 0
    masked = capsys.readouterr().out
    assert "style" in masked and masked != plain


def test_colour_flag(tmp_path, files, stylize_calls, capsys):
    out = tmp_path / "out.png"
    code = main(["stylize", "--content", files["content"], "--style", files["sea"],
                 "--colour", "luminance", "-o", str(out), *SMALL])
    assert code == 0, capsys.readouterr().err
    assert stylize_calls[0]["options"].colour == "luminance"
    with pytest.raises(SystemExit) as info:
        main(["stylize", "--content", files["content"], "--style", files["sea"],
              "--colour", "sepia", "-o", str(out), *SMALL])
    assert info.value.code == 2
    assert "invalid choice: 'sepia'" in capsys.readouterr().err
