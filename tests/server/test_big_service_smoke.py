"""bench/big_service.py --smoke: a real ``gramstyle serve`` at default limits except 1 KiB
result chunks, a 96 px Stylize through the client library's defaults, chunked, reassembled,
and equal to the in-process engine's image of the same seed and options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_big_service_smoke():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "big_service.py"), "--smoke"],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    report = json.loads(lines[-1])
    assert proc.returncode == 0 and report["ok"], (report, proc.stderr[-3000:])
    assert (report["width"], report["height"]) == (96, 64)  # chelsea.png is 451x300
    assert report["server_limits"]["max_size"] == 4096
    assert report["server_limits"]["max_message_bytes"] == 64 * 2**20
    # 1 KiB chunks: the result came in pieces, and no message was larger than a chunk and
    # its framing (a progress message without preview is a few hundred bytes).
    assert report["chunk_messages"] == -(-report["encoded_bytes"] // 1024) >= 5
    assert report["largest_message_bytes"] <= 1024 + 32
    assert report["messages"] == report["progress_messages"] + report["chunk_messages"] + 1
    assert report["max_diff_levels"] <= 2 and report["mean_diff_levels"] < 0.05
    assert report["server_peak_rss_bytes"] > 100 * 2**20  # measured, not a placeholder
