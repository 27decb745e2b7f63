"""bench/image_bombs.py --decode --smoke: the worst file of every input format, decoded
in-process and in a child process, and stopped at a deadline (issue 18's "no input holds a
worker past its deadline", at 256 px; the full-size figures are in docs/service.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_image_decode_bench_smoke():
    # A stop at 1 ms: every case is stopped mid-way (or had finished), never waited for.
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "image_bombs.py"), "--decode",
                           "--smoke", "--deadline", "0.001"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    formats = {row["case"].rsplit(" ", 1)[0] for row in rows}
    assert formats == {"JPEG 32 scans", "PNG RGBA", "PNG 16-bit grey", "GIF", "TIFF raw",
                       "TIFF deflate", "WebP lossy", "WebP lossless", "BMP"}
    for row in rows:
        assert row["case"].endswith(" 256px") and row["bytes"] > 0
        assert 0 <= row["in_process_s"] < 5 and 0 <= row["child_s"] < 5, row
        late = row["past_deadline_s"]
        assert late == "finished first" or late < 0.5, row
