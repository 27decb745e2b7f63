"""A closed stdout pipe (``gramstyle info | head -1``) ends the command quietly."""

from __future__ import annotations

import os
import subprocess
import sys

from gramstyle.cli import EXIT_BROKEN_PIPE


def test_info_into_a_closed_pipe_ends_quietly():
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes anything, like `| head -0`
    try:
        proc = subprocess.run([sys.executable, "-m", "gramstyle.cli", "info"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == EXIT_BROKEN_PIPE == 141
    assert proc.stderr == ""  # no "internal error", no "Exception ignored" at exit


def test_info_piped_into_head_prints_its_first_line_only():
    proc = subprocess.run(
        ["bash", "-c", f"'{sys.executable}' -m gramstyle.cli info | head -1; "
                       "echo \"status ${PIPESTATUS[0]}\" >&2"],
        capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("gramstyle ") and proc.stdout.count("\n") == 1
    # Either info finished before head closed the pipe (0), or it noticed the close (141);
    # never the old "internal error: BrokenPipeError", exit 1.
    assert proc.stderr.strip() in ("status 0", f"status {EXIT_BROKEN_PIPE}"), proc.stderr
