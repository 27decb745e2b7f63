"""The machine facts every benchmark records next to its figures: CPU model and load.

bench/ is not a package: the scripts run as ``python bench/NAME.py``, which puts this folder
on ``sys.path``, so they import this module as ``machine``.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` where there is none)."""
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        return match.group(1).strip() if match else platform.processor()
    except OSError:
        return platform.processor()


def load1() -> float:
    """The 1-minute load average (NaN where /proc/loadavg cannot be read)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")
