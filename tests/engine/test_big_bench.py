"""bench/big.py --smoke: every configuration runs in its own process and reports its peak
RSS, its time per iteration at each scale, the seam measure and the cost ratio."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _bench():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_big", REPO / "bench" / "big.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_seam_ratio_sees_a_tile_grid():
    big = _bench()
    rng = np.random.default_rng(0)
    smooth = rng.random((64, 96, 3), dtype=np.float32) * 0.1
    assert big.seam_ratio(smooth, 32, 16) == pytest.approx(1.0, abs=0.15)
    stepped = smooth.copy()
    stepped[:, 32:] += 0.5  # a step at the border between the first two tile columns
    assert big.seam_ratio(stepped, 32, 16) > 3
    assert math.isnan(big.seam_ratio(smooth, 128, 16))  # one tile: no borders


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_big_bench_smoke(tmp_path):
    rows = _bench().main(["--smoke", "--out", str(tmp_path), "--images", str(tmp_path)])
    assert [r["label"] for r in rows] == ["tile 32", "untiled", "tiled (auto)"]
    assert all(r["size"] == 96 for r in rows)
    for row in rows:
        assert row["width"] == 96 and row["height"] == 72
        assert row["peak_mib"] > row["resident_mib"] > 100  # the child's own ru_maxrss
        assert len(row["scales"]) == 1 and row["scales"][0]["s_per_it"] > 0
        assert math.isfinite(row["loss"])
        # The engine's estimate is never below the run's own measured peak (VmHWM reset
        # before the run, over what was resident then), tiled or not.
        assert row["run_peak_mib"] - row["resident_mib"] <= row["estimate_mib"], row
    tiled, untiled = rows[0], rows[1]
    assert tiled["final_tile"] == 32 and untiled["final_tile"] == 0
    # The same objective: the same loss, and the control shows the same seam measure.
    assert tiled["loss"] == pytest.approx(untiled["loss"], rel=1e-2)
    assert tiled["seam_ratio"] == pytest.approx(untiled["seam_ratio"], rel=0.05)
    saved = json.loads((tmp_path / "big_smoke.json").read_text())
    assert [r["label"] for r in saved] == [r["label"] for r in rows]
    table = (tmp_path / "big_smoke.md").read_text()
    assert "Intel" in table or "CPU:" in table
    assert "Cost at 96 px" in table
    assert (tmp_path / "big_smoke.png").stat().st_size > 1000
