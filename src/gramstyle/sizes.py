"""Byte counts as people write and read them: ``512M``, ``8G`` or ``1.5GiB`` in,
``512 MiB`` or ``1.20 GiB`` out. Torch-free (the CLI and the server's settings use it)."""

from __future__ import annotations

import re

#: Bytes per unit letter; a size without a unit is in MiB.
_UNITS = {"": 2**20, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """Bytes from '512M', '8G', '1.5GiB', '2048' (MiB when no unit); ValueError otherwise
    (also for 0)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(
            f"expected a size such as 512M, 8G or 1.5GiB (MiB without a unit), got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: int, digits: int = 2) -> str:
    """``n`` bytes as 'X.XX GiB' (``digits`` decimals) from 1 GiB up, else as whole MiB."""
    return f"{n / 2**30:.{digits}f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


__all__ = ["format_size", "parse_size"]
