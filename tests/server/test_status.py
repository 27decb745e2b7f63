"""Status messages (gramstyle.server.status)."""

from __future__ import annotations

from gramstyle.server.status import MAX_STATUS_BYTES, cap_message


def test_cap_message_keeps_any_message_under_1_kib():
    long = "content[0]: " + "é" * 3000
    capped = cap_message(long)
    assert len(capped.encode()) <= MAX_STATUS_BYTES
    assert capped.startswith("content[0]: éé") and capped.endswith(f"… ({len(long)} chars)")
    assert cap_message("short") == "short"
