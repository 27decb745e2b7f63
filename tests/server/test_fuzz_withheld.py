"""bench/fuzz.py's withheld cases (issue 18): a message sent without its last byte, on any
method, is cut off by the server at its --message-timeout -- never a hang."""

from __future__ import annotations

import time

import grpc
import pytest
from conftest import build_server

from bench import fuzz
from gramstyle.v1 import gramstyle_pb2 as pb


@pytest.mark.parametrize("method,payload,out_stream,in_stream", [
    (f"/{fuzz.SERVICE}/ComputeLosses",
     pb.ComputeLossesRequest(candidate=b"x" * 50_000).SerializeToString(), False, False),
    (f"/{fuzz.SERVICE}/Stylize",
     pb.StylizeRequest(content=[pb.WeightedImage(data=b"y" * 50_000)]).SerializeToString(),
     True, False),
])
def test_a_withheld_case_is_cut_off(random_engine, method, payload, out_stream, in_stream):
    case = fuzz.Case(method, payload, out_stream, in_stream, withheld=True)
    assert "withheld" in repr(case)
    with build_server([random_engine], message_timeout_s=1.0) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        start = time.monotonic()
        code = fuzz.send(channel, case, deadline=5.0, target=f"127.0.0.1:{server.port}")
        took = time.monotonic() - start
    assert code == "CUT_OFF" and 0.9 < took < 4.0, (code, took)
