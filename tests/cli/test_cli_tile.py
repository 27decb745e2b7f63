"""``gramstyle losses --tile``: the tiled gradient is the untiled one (issue 19)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import noise

from gramstyle.cli import main


def test_losses_tile_flag_gives_the_untiled_gradient(tmp_path, capsys):
    candidate, content, style = (tmp_path / f"{n}.png" for n in ("x", "c", "s"))
    noise(96, 64, 1).save(candidate)
    noise(96, 64, 2).save(content)
    noise(80, 80, 3).save(style)
    common = [str(candidate), "--content", str(content), "--style", str(style), "--arch",
              "vgg16", "--weights", "random", "--device", "cpu", "--precision", "fp32",
              "--content-layers", "relu2_2", "--style-layers", "relu1_1,relu2_1,relu3_1",
              "--tv-weight", "1"]
    outputs = {}
    for tile in ("32", "off"):
        path = tmp_path / f"g{tile}.npy"
        assert main(["losses", *common, "--tile", tile, "--gradient", str(path)]) == 0
        outputs[tile] = capsys.readouterr().out
        assert path.exists()
    tiled, whole = np.load(tmp_path / "g32.npy"), np.load(tmp_path / "goff.npy")
    assert tiled.shape == whole.shape == (3, 64, 96)
    assert np.linalg.norm(tiled - whole) / np.linalg.norm(whole) < 1e-4
    total = [float(line.split()[1]) for out in outputs.values()
             for line in out.splitlines() if line.startswith("total")]
    assert len(total) == 2 and total[0] == pytest.approx(total[1], rel=1e-5)


def test_losses_tile_flag_refuses_a_bad_value(tmp_path, capsys):
    noise(32, 32).save(tmp_path / "x.png")
    assert main(["losses", str(tmp_path / "x.png"), "--tile", "8"]) == 2
    assert ("gramstyle: error: --tile: must be auto, off or an integer between 16 and 4096 "
            "pixels, got 8") in capsys.readouterr().err
