"""The local CLI: end to end, and every bad input exits 2 naming the option, writing nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from gramstyle.cli import flag_message, main
from gramstyle.errors import FieldError

SMALL = ["--size", "64", "--iterations", "3", "--arch", "vgg19", "--weights", "random",
         "--device", "cpu", "--quiet"]


@pytest.mark.slow
def test_console_script_end_to_end(tmp_path, images, vgg16_weights):
    exe = shutil.which("gramstyle") or shutil.which("gramstyle", path=Path(sys.executable).parent)
    assert exe, "the gramstyle console script is not installed"
    out, sheet = tmp_path / "out.png", tmp_path / "sheet.png"
    proc = subprocess.run(
        [exe, "stylize", "--content", str(images["cat"]), "--style", str(images["starry"]),
         "-o", str(out), "--size", "80", "--iterations", "12", "--arch", "vgg16",
         "--weights", str(vgg16_weights), "--device", "cpu", "--save-every", "5",
         "--progress-every", "4", "--progress-sheet", str(sheet)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out} (80x53) after 12 iterations" in proc.stdout
    assert "12/12" in proc.stderr  # the tqdm bar
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (80, 53)
        assert image.getextrema() != ((0, 0), (0, 0), (0, 0))
    assert sorted(p.name for p in tmp_path.glob("out_*.png")) == ["out_0005.png",
                                                                  "out_0010.png"]
    with Image.open(sheet) as image:
        # iterations 0, 4, 8, 12 and the content image, each in a 192 px tile.
        assert image.width > 5 * 192 and image.height > 100


@pytest.mark.slow
def test_two_contents_two_styles_and_jpeg(tmp_path, images, capsys):
    out = tmp_path / "out.jpg"
    code = main(["stylize", "--content", str(images["cat"]), "--content", str(images["coffee"]),
                 "--content-weights", "0.5,0.5", "--style", str(images["starry"]),
                 "--style", str(images["scream"]), "--style-weights", "1,3", "-o", str(out),
                 *SMALL])
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as image:
        assert image.format == "JPEG" and image.size == (64, 43)


@pytest.mark.parametrize("args, message", [
    (["--iterations", "0"], "--iterations: must be between 1 and"),
    (["--size", "5000"], "--size: must be an integer between 16 and 4096 pixels, got 5000"),
    (["--style-layers", "relu1_1,relu9_1"], "--style-layers: unknown layer 'relu9_1'"),
    (["--content-layers", "nope"], "--content-layers: unknown layer 'nope'"),
    (["--style-weights", "1,1"], "--style-weights: expected 1 value(s)"),
    (["--content", "{tmp}/missing.png"], "--content #2: file not found: '{tmp}/missing.png'"),
    (["--style", "{tmp}/corrupt.jpg"], "--style #2: corrupt or truncated image"),
    (["--style", "{tmp}/empty.png"], "--style #2: empty image"),
    (["--style", "{tmp}"], "--style #2: is a directory"),
    (["--weights", "{tmp}/missing.pth"], "--weights: file not found: '{tmp}/missing.pth'"),
    (["--weights", "{tmp}/bad.pth"], "--weights: '{tmp}/bad.pth' does not match vgg19"),
    (["-o", "{tmp}/no/such/out.png"], "--output: folder does not exist: '{tmp}/no/such'"),
    (["-o", "{tmp}/out.gif"], "--output: unsupported output file type '{tmp}/out.gif'"),
])
def test_bad_input_exits_2_naming_the_option(tmp_path, images, capsys, args, message):
    import torch

    (tmp_path / "corrupt.jpg").write_bytes(images["starry"].read_bytes()[:300])
    (tmp_path / "empty.png").write_bytes(b"")
    torch.save({"0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    args = [a.format(tmp=tmp_path) for a in args]
    out = tmp_path / "out.png"
    output = [] if "-o" in args else ["-o", str(out)]
    code = main(["stylize", "--content", str(images["cat"]), "--style", str(images["starry"]),
                 *output, *SMALL, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message.format(tmp=tmp_path) in err
    assert not out.exists() and not list(tmp_path.glob("out*"))
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("args, message", [
    (["--style-weight", "nan"], "--style-weight: must be a finite number >= 0, got 'nan'"),
    (["--content-weight", "-1"], "--content-weight: must be a finite number >= 0, got '-1'"),
    (["--style-layer-weights", "1,x"], "--style-layer-weights: 'x' is not a number"),
    (["--arch", "resnet"], "--arch: invalid choice: 'resnet'"),
])
def test_argparse_level_errors_exit_2(tmp_path, images, capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(["stylize", "--content", str(images["cat"]), "--style", str(images["starry"]),
              "-o", str(tmp_path / "o.png"), *SMALL, *args])
    assert info.value.code == 2
    assert message.split(": ", 1)[1] in capsys.readouterr().err


def test_flag_message_translation():
    # The field comes from the error's .field, never from its message.
    assert flag_message(FieldError("content[1]", "file not found")) == \
        "--content #2: file not found"
    assert flag_message(FieldError("style_blend_weights", "bad")) == "--style-weights: bad"
    assert flag_message(FieldError("learning_rate", "diverged")) == "--lr: diverged"
    assert flag_message(ValueError("no field here")) == "no field here"
    assert flag_message(ValueError("content_weight: not a FieldError")) == \
        "content_weight: not a FieldError"


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    from gramstyle import kernels
    assert out.startswith("gramstyle ") and f"kernel    {kernels.backend()}" in out


def test_unexpected_errors_are_one_line_exit_1(monkeypatch, tmp_path, images, capsys):
    import gramstyle.engine.transfer as engine

    def out_of_memory(*args, **kwargs):
        import torch
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine.StyleTransfer, "stylize", out_of_memory)
    args = ["stylize", "--content", str(images["cat"]), "--style", str(images["starry"]),
            "-o", str(tmp_path / "o.png"), *SMALL]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "gramstyle: error: out of memory (CUDA out of memory." in err
    assert "--size" in err and "Traceback" not in err

    monkeypatch.setattr(engine.StyleTransfer, "stylize",
                        lambda *a, **k: (_ for _ in ()).throw(KeyError("boom")))
    assert main(args) == 1
    assert "internal error: KeyError: 'boom'" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.slow
def test_init_defaults_follow_the_inputs(tmp_path, images, capsys):
    # --init-image alone starts from that image; no content at all starts from noise.
    assert main(["stylize", "--content", str(images["cat"]), "--style", str(images["starry"]),
                 "--init-image", str(images["coffee"]), "-o", str(tmp_path / "a.png"),
                 *SMALL]) == 0
    assert main(["stylize", "--style", str(images["starry"]), "--content-weight", "0",
                 "-o", str(tmp_path / "b.png"), *SMALL]) == 0
    with Image.open(tmp_path / "b.png") as image:
        assert image.size == (64, 40)  # the style image's aspect ratio
    code = main(["stylize", "--content", str(images["cat"]), "--style", str(images["starry"]),
                 "--init", "noise", "--init-image", str(images["coffee"]),
                 "-o", str(tmp_path / "c.png"), *SMALL])
    assert code == 2
    assert "--init-image: given, but init is 'noise'" in capsys.readouterr().err


def test_timeout_needs_a_server(tmp_path, images, capsys):
    code = main(["stylize", "--content", str(images["cat"]), "--style", str(images["starry"]),
                 "--timeout", "5", "-o", str(tmp_path / "o.png"), *SMALL])
    assert code == 2 and "--timeout: is the deadline of a call to --server" in (
        capsys.readouterr().err)


def test_progress_sheet_frames_thinning_and_labels(tmp_path, images, monkeypatch):
    """The sheet holds the frames every --progress-every iterations plus the content image;
    beyond 8 frames it is thinned evenly, keeping the first and the last; each label names
    the iteration its image is from (compared with the --save-every frames)."""
    import numpy as np

    from gramstyle.cli import progress_sheet

    drawn = []
    draw = progress_sheet.draw_progress_sheet

    def spy(frames, *args, **kwargs):
        drawn.append([(label, image.copy()) for label, image in frames])
        return draw(frames, *args, **kwargs)

    monkeypatch.setattr(progress_sheet, "draw_progress_sheet", spy)
    out, sheet = tmp_path / "out.png", tmp_path / "sheet.png"
    assert main(["stylize", "--content", str(images["cat"]), "--style", str(images["starry"]),
                 "-o", str(out), "--size", "32", "--iterations", "18", "--progress-every", "2",
                 "--save-every", "1", "--progress-sheet", str(sheet), "--arch", "vgg19",
                 "--weights", "random", "--device", "cpu", "--quiet"]) == 0
    (frames,) = drawn
    # 10 frames (iterations 0, 2, ..., 18), thinned to 8 at evenly spaced indices.
    kept = [2 * round(i) for i in np.linspace(0, 9, 8)]
    assert kept == [0, 2, 6, 8, 10, 12, 16, 18]
    assert [label for label, _ in frames] == [f"iteration {i}" for i in kept] + ["content"]
    for (label, image), iteration in zip(frames, kept, strict=False):
        if iteration == 18:
            expected = Image.open(out)  # the last frame is the output itself
        elif iteration == 0:  # the start: the content image (init content) at 32 px
            expected = Image.open(images["cat"]).convert("RGB").resize(image.size,
                                                                       Image.LANCZOS)
            assert np.abs(np.asarray(image, float) - np.asarray(expected, float)).mean() < 3
            continue
        else:
            expected = Image.open(tmp_path / f"out_{iteration:04d}.png")
        assert np.array_equal(np.asarray(image), np.asarray(expected)), label
    # The file is that drawing: nine 192 px tiles (all landscape) with 8 px gaps.
    with Image.open(sheet) as written:
        assert written.width == 9 * 192 + 10 * 8
        assert np.array_equal(np.asarray(written),
                              np.asarray(draw(frames)))


def test_pick_frames_thins_evenly_keeping_first_and_last():
    from gramstyle.cli.progress_sheet import MAX_FRAMES, pick_frames

    frames = [(i, None) for i in range(0, 110, 10)]  # 11 frames
    assert pick_frames(frames[:MAX_FRAMES]) == frames[:MAX_FRAMES]  # 8: all kept
    picked = [i for i, _ in pick_frames(frames)]
    assert len(picked) == MAX_FRAMES and picked[0] == 0 and picked[-1] == 100
    assert picked == sorted(set(picked))
    gaps = {b - a for a, b in zip(picked, picked[1:], strict=False)}
    assert gaps <= {10, 20}  # evenly spread: no gap wider than two frames
