"""A decode that outlasts its call's deadline frees the worker within a second (issue 18: no
input holds a worker more than 1 s past its deadline): the service decodes large images in
a child process (gramstyle.decode_process) and kills it when the call ends."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import build_server
from PIL import Image

from gramstyle.images import MAX_JPEG_SCANS
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from fuzz import scan_bomb  # noqa: E402


@pytest.fixture(scope="module")
def server(random_engine):
    with build_server([random_engine], workers=1, queue_size=2) as srv:
        yield srv


def _png(side: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(side)
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("rpc", ["Stylize", "ComputeLosses"])
def test_a_decode_past_the_deadline_frees_the_worker_within_a_second(server, rpc):
    # 4096 x 4096 with the most scans allowed: seconds to decode, in one Pillow call.
    slow = scan_bomb(Image.new("RGB", (4096, 4096), (200, 100, 50)), MAX_JPEG_SCANS)
    small = _png(48)
    service = server.service
    killed = service.decoder.killed
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.StyleTransferServiceStub(channel)
        # Warm up: the first call waits for the probe and decode children's interpreters.
        list(stub.Stylize(pb.StylizeRequest(
            content=[pb.WeightedImage(data=small)], style=[pb.WeightedImage(data=small)],
            size=32, iterations=1), timeout=60))
        # Four slow images: 3 to 12 s of decoding, so that the stop comes in one of them
        # even when a loaded machine is slow to start the job.
        deadline = 2.0
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            if rpc == "Stylize":
                list(stub.Stylize(pb.StylizeRequest(
                    content=[pb.WeightedImage(data=slow)] * 4,
                    style=[pb.WeightedImage(data=small)], size=32, iterations=2),
                    timeout=deadline))
            else:
                stub.ComputeLosses(pb.ComputeLossesRequest(
                    candidate=_png(32), content=[pb.WeightedImage(data=small)],
                    style=[pb.WeightedImage(data=slow)] * 4), timeout=deadline)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        while service.work.busy and time.monotonic() - start < deadline + 5:
            time.sleep(0.01)
        freed = time.monotonic() - start - deadline
        assert service.work.busy == 0
        assert freed < 1.0, f"the worker was busy {freed:.2f} s past the deadline"
        assert service.decoder.killed == killed + 1  # the decode was killed, not waited for
        # The next call decodes (in the restarted child) and runs.
        answer = list(stub.Stylize(pb.StylizeRequest(
            content=[pb.WeightedImage(data=_png(1100))], style=[pb.WeightedImage(data=small)],
            size=32, iterations=1), timeout=60))
        assert answer[-1].HasField("result")
