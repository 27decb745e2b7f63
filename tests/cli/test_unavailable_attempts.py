"""A call that stays UNAVAILABLE says how many attempts it made, alike in Python and in the
CLI."""

from __future__ import annotations

import socket

import pytest

from gramstyle.cli import EXIT_FAILURE, main
from gramstyle.client import Client, ServiceError


@pytest.fixture
def dead_target() -> str:
    """An address nobody listens on (a port bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


def test_python_and_cli_both_say_after_n_attempts(dead_target, capsys):
    with Client(dead_target, timeout=20, retries=2) as client, \
            pytest.raises(ServiceError) as caught:
        client.server_info()
    error = caught.value
    assert error.attempts == 3
    assert str(error) == f"UNAVAILABLE: {error.message} (after 3 attempts)"

    assert main(["info", "--server", dead_target, "--retries", "2"]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert err.startswith("gramstyle: error: server answered UNAVAILABLE: ")
    assert err.rstrip().endswith(" (after 3 attempts)")
