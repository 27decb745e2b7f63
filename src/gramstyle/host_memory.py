"""How much memory this process may use, and how much it holds: the machine's memory, or
its container's cgroup limit when lower.

The service's default memory budget (:func:`gramstyle.server.admission.default_memory_budget`)
and the in-process engine's ``tile`` "auto" (:meth:`gramstyle.engine.StyleTransfer.stylize`)
both read it; it lives in the torch-free core so that both may import it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
_CGROUP_USAGE = ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes")


def _read_int(paths: tuple[str, ...]) -> int | None:
    """The first of ``paths`` that holds a plain integer ("max" and missing files: None)."""
    for path in paths:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


def machine_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its container's limit
    (cgroup v2 ``memory.max`` or v1 ``memory.limit_in_bytes``) when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _read_int(_CGROUP_LIMITS)
    return min(total, limit) if limit is not None else total


def process_rss() -> int:
    """This process's resident memory, in bytes (0 where /proc is missing)."""
    try:
        match = re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:
        return 0
    return int(match.group(1)) * 1024 if match else 0


def available_memory() -> int:
    """Bytes a new allocation may take now: the kernel's ``MemAvailable`` (free memory plus
    the page cache it can drop), and no more than the container's limit less its usage.
    Where /proc/meminfo is missing, :func:`machine_memory` less :func:`process_rss`."""
    try:
        match = re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text())
    except OSError:
        match = None
    available = (int(match.group(1)) * 1024 if match
                 else machine_memory() - process_rss())
    limit, usage = _read_int(_CGROUP_LIMITS), _read_int(_CGROUP_USAGE)
    if limit is not None and usage is not None:
        available = min(available, limit - usage)
    return max(0, available)


__all__ = ["available_memory", "machine_memory", "process_rss"]
