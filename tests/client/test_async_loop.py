"""An AsyncClient outside its event loop says what to do, instead of grpc's "Future ...
attached to a different loop"."""

from __future__ import annotations

import asyncio

import pytest

from gramstyle.client import AsyncClient


def test_async_client_created_outside_a_running_loop_says_where_to_create_it():
    with pytest.raises(RuntimeError, match=r"^AsyncClient: create it inside the running event "
                                           r"loop, e\.g\. `async with AsyncClient\(\.\.\.\) as "
                                           r"client:` in an async function run by "
                                           r"asyncio\.run\(\)"):
        AsyncClient("127.0.0.1:1")


def test_async_client_used_in_a_second_loop_says_to_create_one_per_loop():
    async def create() -> AsyncClient:
        return AsyncClient("127.0.0.1:1", retries=0)

    client = asyncio.run(create())
    for call in (client.server_info, lambda: client.compute_losses(b"x"),
                 lambda: client.stylize(b"x")):
        with pytest.raises(RuntimeError, match=r"^AsyncClient: called outside the event loop it "
                                               r"was created in .*create one client in each "
                                               r"loop$"):
            asyncio.run(call())
    with pytest.raises(RuntimeError, match="called outside the event loop it was created in"):
        client.stylize_stream(b"x")  # not even in a loop
