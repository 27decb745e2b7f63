"""The smoke modes of issue 18's full-size reproductions (bench/message_flood.py,
bench/image_bombs.py): they run, and their small attacks stay within the bounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, timeout: float) -> tuple[int, list[dict]]:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--smoke"],
                          capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    return proc.returncode, json.loads(lines[-1])


def test_image_bombs_smoke():
    code, rows = _run("image_bombs.py", 120)
    assert code == 0
    outcomes = {row["case"]: row["outcome"] for row in rows}
    assert len(outcomes) == 6
    for case, outcome in outcomes.items():
        expected = "refused" if "(bomb)" in case else "decoded"
        assert outcome.startswith(expected), (case, outcome)
    assert all(row["seconds"] < 2 for row in rows), rows


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_message_flood_smoke():
    code, rows = _run("message_flood.py", 300)
    by_attack = {row["attack"]: row for row in rows}
    assert by_attack["unauthenticated"]["codes"] == {"UNAUTHENTICATED": 3}
    assert by_attack["invalid"]["codes"] == {"INVALID_ARGUMENT": 3}
    assert by_attack["gzip"]["codes"] == {"UNIMPLEMENTED": 3}
    assert by_attack["withheld"]["codes"] == {"ENDED": 3}  # cut off at --message-timeout
    assert by_attack["withheld"]["seconds"] < 10
    assert code == 0, rows
