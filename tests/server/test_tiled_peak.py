"""The memory estimate is never below the measured peak RSS for tiled runs either: Stylize
and ComputeLosses with ``tile`` set, in fp32 and bf16 (the script of test_memory.py, in a
fresh process)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import can_reset_peak_rss


def _script() -> str:
    path = Path(__file__).with_name("test_memory.py")
    spec = importlib.util.spec_from_file_location("memory_estimate_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ESTIMATE_SCRIPT


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not can_reset_peak_rss(), reason="needs Linux /proc peak-RSS reset")
def test_tiled_estimate_is_not_below_measured_peak_rss():
    cases = [
        {"content": [192, 144], "styles": [[96, 96]],
         "options": {"size": 192, "iterations": 2, "tolerance": 0.0, "precision": "fp32",
                     "tile": 64}},
        {"content": [192, 144], "styles": [[96, 96]],
         "options": {"size": 192, "iterations": 2, "tolerance": 0.0, "precision": "bf16",
                     "tile": 64}},
        {"content": [96, 96], "styles": [[96, 96]], "candidate": [192, 128],
         "options": {"precision": "fp32", "tile": 64}},
    ]
    proc = subprocess.run([sys.executable, "-c", _script(), json.dumps(cases)],
                          capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in json.loads(proc.stdout.splitlines()[-1]):
        print(f"{row['case']}: estimate {row['estimate'] / 2**20:.0f} MiB, "
              f"peak {row['peak'] / 2**20:.0f} MiB")
        assert row["estimate"] >= row["peak"], row
