"""Issue 11, the time to a finished image: auto precision, the early stop, the target cache,
a step loop without host synchronisation, and what the results report about all of them.

Timing targets live in bench/ (time_to_quality.py, bench_engine.py), never here: these tests
check behaviour -- counts of network passes, of host reads, of iterations -- not seconds.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import grpc
import pytest
import torch
from PIL import Image

from gramstyle import codec
from gramstyle.engine import optimise as optimise_module
from gramstyle.engine import precision
from gramstyle.engine.lbfgs import LBFGS
from gramstyle.engine.optimise import Convergence
from gramstyle.engine.stop import Cancelled
from gramstyle.engine.target_cache import TargetCache, image_digest
from gramstyle.engine.transfer import StyleTransfer
from gramstyle.images import load_image, resize_long_side
from gramstyle.options import CONVERGENCE_CHECK_EVERY, CONVERGENCE_WINDOW, StyleOptions
from gramstyle.results import Losses, Progress, ServerInfo, StylizeResult
from gramstyle.server.serve import GramstyleServer, ServeConfig
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc


def small(path, size=48) -> Image.Image:
    return resize_long_side(load_image(path), size)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def engine():
    """A private engine (its own target cache), so counts start at zero."""
    return StyleTransfer(arch="vgg19", weights="random", device="cpu")


@contextlib.contextmanager
def counting_passes(engine: StyleTransfer):
    """Count the extractor's forward passes (each is one network pass)."""
    calls = []
    forward = engine.extractor.forward

    def counted(images, *args, **kwargs):
        calls.append(tuple(images.shape))
        return forward(images, *args, **kwargs)

    engine.extractor.forward = counted
    try:
        yield calls
    finally:
        del engine.extractor.forward


# ------------------------------------------------------------------------ precision 'auto'

@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_follows_the_capability_probe(monkeypatch, random_engine, images,
                                                      native, expected):
    probed = []

    def probe(device):
        probed.append(device.type)
        return native

    monkeypatch.setattr(precision, "native_bf16", probe)
    assert random_engine.auto_precision == expected and probed == ["cpu"]
    assert random_engine.validate(StyleOptions()).precision == expected
    # Explicit choices are kept whatever the hardware.
    for explicit in ("fp32", "bf16"):
        assert random_engine.validate(StyleOptions(precision=explicit)).precision == explicit
    seen: list[Progress] = []
    result = random_engine.stylize([images["cat"]], [images["starry"]],
                                   StyleOptions(size=32, iterations=2), progress=seen.append)
    assert result.precision == expected
    assert {p.precision for p in seen} == {expected}
    report = random_engine.compute_losses(small(images["cat"], 32), [images["cat"]],
                                          [images["starry"]])
    assert report.precision == expected


def test_capability_probe_reads_cuda_and_cpu_features(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                        not including_emulation)
    assert precision.native_bf16(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                        including_emulation)  # emulated only: not native
    assert not precision.native_bf16(torch.device("cuda"))
    assert not precision.native_bf16(torch.device("meta"))

    # A torch without the cpuinfo probe: the kernel's flags decide.
    class NoProbe:
        pass

    for flags, features in (({"avx512f", "avx512_bf16"}, ("AVX512-BF16",)),
                            ({"amx_tile", "amx_bf16"}, ("AMX",)), ({"avx2"}, ())):
        precision.cpu_bf16_features.cache_clear()
        monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(precision.torch, "cpu", NoProbe())
        monkeypatch.setattr(precision, "_cpuinfo_flags", lambda f=flags: set(f))
        assert precision.cpu_bf16_features() == features
        assert precision.native_bf16(torch.device("cpu")) == bool(features)
    precision.cpu_bf16_features.cache_clear()
    monkeypatch.setattr(precision.platform, "machine", lambda: "aarch64")
    assert precision.cpu_bf16_features() == ()
    precision.cpu_bf16_features.cache_clear()


def test_precision_auto_on_the_wire():
    # Unset and AUTO both mean auto; answers carry the precision used.
    assert codec.stylize_options(pb.StylizeRequest()).precision == "auto"
    assert codec.stylize_options(pb.StylizeRequest(precision=pb.PRECISION_AUTO)).precision \
        == "auto"
    assert codec.stylize_request(b"c", [b"s"], precision="auto").precision == pb.PRECISION_AUTO
    losses = Losses(total=1.0, content=0.5, style=0.1, tv=0.0)
    result = StylizeResult(image=Image.new("RGB", (4, 3)), iterations=25, losses=losses,
                           elapsed_s=1.0, backend="cpu", device="cpu", precision="bf16",
                           stop_reason="converged")
    message = codec.result_message(result, "png").result
    assert message.stats.precision == pb.PRECISION_BF16
    assert message.stats.stop_reason == pb.STOP_REASON_CONVERGED
    back = codec.result_from(message)
    assert (back.precision, back.stop_reason, back.iterations) == ("bf16", "converged", 25)
    progress = codec.progress_message(Progress(5, 10, losses, 0.1, precision="fp32"), "png")
    assert codec.progress_from(progress.progress).precision == "fp32"
    # An older server reports nothing: the fields read as ''.
    assert codec.result_from(pb.Result(image=message.image)).stop_reason == ""
    info = ServerInfo(version="x", models=[], backend="cpu", device="cpu",
                      limits={}, busy_workers=0, queued=0, precision="bf16")
    assert codec.server_info_message(info).precision == pb.PRECISION_BF16


# ------------------------------------------------------------------------ the early stop

def feed(convergence: Convergence, losses: list[float]) -> int | None:
    """Feed per-step losses as the loop does; the step count at which it converged."""
    for step, loss in enumerate(losses, start=1):
        convergence.add(step, torch.tensor(loss))
        if step % CONVERGENCE_CHECK_EVERY == 0:
            values = [t.item() for t in convergence.tensors()]
            if convergence.check(step, values, 0):
                return step
    return None


def test_convergence_rule():
    window, every = CONVERGENCE_WINDOW, CONVERGENCE_CHECK_EVERY
    # A loss falling by a fraction r per step improves by 1 - (1 - r)**W per window.
    r = 0.001
    per_window = 1 - (1 - r) ** window
    falling = [(1 - r) ** i for i in range(400)]
    assert feed(Convergence(per_window * 1.01), falling) == window + every  # first test
    assert feed(Convergence(per_window * 0.99), falling) is None  # never below it
    assert feed(Convergence(0.0), [1.0] * 100) is None  # 0 disables it
    # Fast progress, then a plateau from the 41st loss: stops at the first check whose window
    # starts on the plateau (checks are every 5 steps: 45 + W).
    plateau = [1.0 - 0.02 * i for i in range(40)] + [0.2] * 100
    assert feed(Convergence(1e-3), plateau) == 45 + window
    # The best loss counts, not the last one: an uphill step does not reset the clock,
    # nor does it count as progress.
    spiky = [1.0] * 30 + [5.0] + [1.0] * 30
    assert feed(Convergence(1e-3), spiky) == window + every


def test_divergence_is_reported_with_its_iteration():
    convergence = Convergence(0.0)
    for step, loss in enumerate([1.0, 0.9, float("nan"), 0.5, float("inf")], start=1):
        convergence.add(step, torch.tensor(loss))
    values = [t.item() for t in convergence.tensors()]
    with pytest.raises(ValueError, match=r"learning_rate: the optimisation diverged \(total "
                                         r"loss nan at iteration 13\)"):
        convergence.check(5, values, done_before=10)


def test_tolerance_stops_early_and_the_result_says_so(random_engine, images):
    seen: list[Progress] = []
    # A tolerance of 1 (100 %) converges at the first test of each scale.
    options = StyleOptions(size=64, scales=2, iterations=60, tolerance=1.0, progress_every=5)
    result = random_engine.stylize([images["cat"]], [images["starry"]], options,
                                   progress=seen.append)
    first_test = CONVERGENCE_WINDOW + CONVERGENCE_CHECK_EVERY
    assert result.stop_reason == "converged" and result.iterations == 2 * first_test
    assert seen[-1].iteration == 2 * first_test and seen[-1].iterations == 120
    assert seen[-1].losses == result.losses
    iterations = [p.iteration for p in seen]
    assert iterations == sorted(set(iterations))
    # 0 runs to the cap.
    capped = random_engine.stylize([images["cat"]], [images["starry"]],
                                   StyleOptions(size=32, iterations=30, tolerance=0))
    assert capped.stop_reason == "cap" and capped.iterations == 30


def test_cancelled_says_how_far_it_got(random_engine, images):
    seen: list[int] = []

    def should_stop() -> bool:  # polled before each step (and maybe during set-up)
        return bool(seen) and seen[-1] >= 3

    with pytest.raises(Cancelled) as info:
        random_engine.stylize([images["cat"]], [images["starry"]],
                              StyleOptions(size=32, iterations=20, progress_every=1),
                              progress=lambda p: seen.append(p.iteration),
                              should_stop=should_stop)
    # Progress for iteration 3 comes with step 4; the poll before step 5 stops the run.
    assert info.value.iterations == 4 and info.value.stop_reason == "cancelled"


# ------------------------------------------------------------------------ no host syncs

def test_steps_read_nothing_back_between_checks(monkeypatch, random_engine, images):
    """Inside an optimiser step nothing reads a device value on the host (on CUDA each read
    would synchronise); the loop reads once per check or report, in one transfer."""
    reads = []
    in_step = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name):
            if in_step:
                reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, spy)
    make = optimise_module.make_optimizer

    def make_spied(x, options):
        optimizer = make(x, options)
        step = optimizer.step

        def spied_step(closure):
            in_step.append(1)
            try:
                return step(closure)
            finally:
                in_step.clear()

        optimizer.step = spied_step
        return optimizer

    monkeypatch.setattr(optimise_module, "make_optimizer", make_spied)
    fetches = []
    fetch = optimise_module.fetch
    monkeypatch.setattr(optimise_module, "fetch", lambda t: fetches.append(len(t)) or fetch(t))
    for optimizer in ("lbfgs", "adam"):
        reads.clear()
        fetches.clear()
        random_engine.stylize([images["cat"]], [images["starry"]], StyleOptions(
            size=32, iterations=12, tolerance=0, optimizer=optimizer))
        if optimizer == "lbfgs":
            assert reads == []
        else:  # torch's Adam reads only its step counter, which it keeps on the CPU
            assert set(reads) <= {"item"} and len(reads) <= 12, reads
        # Checks after 5, 10 and the last (12th) step; no progress callback, no reports.
        assert len(fetches) == 3, (optimizer, fetches)


def test_sync_free_lbfgs_matches_torch():
    torch.manual_seed(0)
    n = 40
    a = torch.randn(n, n, dtype=torch.float64)
    a = a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64)

    def f(x):
        return 0.5 * x @ a @ x - b @ x + 0.01 * (x ** 4).sum()

    x_torch = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    x_ours = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    reference = torch.optim.LBFGS([x_torch], lr=1, max_iter=1, history_size=5,
                                  tolerance_grad=0, tolerance_change=0)
    ours = LBFGS(x_ours, lr=1, history_size=5)
    for _ in range(12):  # well before rounding noise reaches the curvature test
        for optimizer, x in ((reference, x_torch), (ours, x_ours)):
            def closure(optimizer=optimizer, x=x):
                optimizer.zero_grad()
                loss = f(x)
                loss.backward()
                return loss
            optimizer.step(closure)
        torch.testing.assert_close(x_ours, x_torch, rtol=1e-12, atol=1e-12)
    assert f(x_ours) < f(torch.zeros(n, dtype=torch.float64))


# ------------------------------------------------------------------------ the target cache

def test_cache_is_an_lru_bounded_in_bytes():
    cache = TargetCache(max_bytes=1000)
    entry = {"a": torch.zeros(100)}  # 400 bytes
    cache.put("one", entry)
    cache.put("two", {"a": torch.zeros(100)})
    assert cache.get("one") is entry  # "one" is now the most recent
    cache.put("three", {"a": torch.zeros(100)})  # 1200 bytes: evict the oldest, "two"
    assert cache.get("two") is None and cache.get("one") is entry
    assert cache.stats().bytes == 800 and len(cache) == 2
    cache.put("huge", {"a": torch.zeros(1000)})  # over the whole budget: not stored
    assert cache.get("huge") is None and len(cache) == 2
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (2, 2)
    off = TargetCache(0)
    assert off.get_or_compute("k", lambda: entry) is entry and len(off) == 0
    with pytest.raises(ValueError, match="target_cache_mb: must be >= 0"):
        TargetCache(-1)


def test_repeated_compute_losses_costs_one_network_pass(engine, images):
    candidate = small(images["coffee"], 48).resize((48, 32))
    options = StyleOptions(precision="fp32")
    with counting_passes(engine) as passes:
        first = engine.compute_losses(candidate, [images["cat"]], [images["starry"]], options,
                                      gradient=True)
        assert len(passes) == 3  # content target, style target, candidate
        # The same images, given another way (bytes instead of a path), hit the cache.
        second = engine.compute_losses(candidate, [images["cat"].read_bytes()],
                                       [images["starry"]], options, gradient=True)
        assert len(passes) == 4
    assert second.losses == first.losses
    assert second.gradient_bytes == first.gradient_bytes
    stats = engine.target_cache.stats()
    assert (stats.hits, stats.misses) == (2, 2) and stats.bytes > 0


def test_cache_key_separates_what_changes_the_targets(engine, images):
    candidate = small(images["coffee"], 48).resize((48, 32))

    def misses(**changes) -> int:
        before = engine.target_cache.stats().misses
        engine.compute_losses(candidate, [images["cat"]], [images["starry"]],
                              StyleOptions(**{"precision": "fp32", **changes}))
        return engine.target_cache.stats().misses - before

    assert misses() == 2
    assert misses() == 0
    assert misses(style_scale=1.5) == 1  # another style size; the content target is reused
    assert misses(precision="bf16") == 2
    assert misses(style_layers=("relu1_1",)) == 1
    assert misses(content_layers=("relu3_1",)) == 1
    other = StyleTransfer(arch="vgg19", weights="random", device="cpu", seed=1,
                          target_cache=engine.target_cache)  # shared cache, other model
    before = engine.target_cache.stats().misses
    other.compute_losses(candidate, [images["cat"]], [images["starry"]],
                         StyleOptions(precision="fp32"))
    assert engine.target_cache.stats().misses - before == 2
    # Another image with the same size is another digest.
    assert image_digest(small(images["cat"])) != image_digest(small(images["coffee"]))


def test_stylize_and_compute_losses_share_targets(engine, images):
    options = StyleOptions(size=48, iterations=2, precision="fp32", tolerance=0)
    result = engine.stylize([images["cat"]], [images["starry"]], options)
    with counting_passes(engine) as passes:
        report = engine.compute_losses(result.image, [images["cat"]], [images["starry"]],
                                       options)
    assert len(passes) == 1  # only the candidate: both targets came from the cache
    # The returned image is rounded to 8 bits, so its losses differ a little from the run's.
    assert report.losses.total == pytest.approx(result.losses.total, rel=0.01)
    uncached = StyleTransfer(arch="vgg19", weights="random", device="cpu",
                             target_cache=TargetCache(0))
    assert uncached.compute_losses(result.image, [images["cat"]], [images["starry"]],
                                   options).losses == report.losses


# ------------------------------------------------------------------------ through the service

def test_service_reports_precision_stop_reason_and_cache_metrics(images):
    engine = StyleTransfer(arch="vgg19", weights="random", device="cpu")
    server = GramstyleServer([engine], ServeConfig(host="127.0.0.1", port=0)).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.StyleTransferServiceStub(channel)
            info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
            expected = pb.PRECISION_BF16 if engine.auto_precision == "bf16" else \
                pb.PRECISION_FP32
            assert info.precision == expected
            content, style = png(small(images["cat"])), png(small(images["starry"]))
            request = pb.StylizeRequest(content=[pb.WeightedImage(data=content)],
                                        style=[pb.WeightedImage(data=style)], size=48,
                                        iterations=30, tolerance=1.0, progress_every=10)
            messages = list(stub.Stylize(request, timeout=120))
            stats = messages[-1].result.stats
            assert stats.precision == expected and messages[0].progress.precision == expected
            first_test = CONVERGENCE_WINDOW + CONVERGENCE_CHECK_EVERY
            assert stats.stop_reason == pb.STOP_REASON_CONVERGED
            assert stats.iterations == first_test
            candidate = messages[-1].result.image.data
            losses = pb.ComputeLossesRequest(candidate=candidate,
                                             content=[pb.WeightedImage(data=content)],
                                             style=[pb.WeightedImage(data=style)])
            for _ in range(2):
                answer = stub.ComputeLosses(losses, timeout=60)
                assert answer.precision == expected
        registry = server.metrics.registry
        # Stylize missed both targets; both ComputeLosses calls hit them.
        assert registry.get_sample_value("gramstyle_target_cache_misses_total") == 2
        assert registry.get_sample_value("gramstyle_target_cache_hits_total") == 4
        assert registry.get_sample_value("gramstyle_target_cache_bytes") == \
            engine.target_cache.stats().bytes > 0
        assert registry.get_sample_value("gramstyle_iterations_total") == first_test
    finally:
        server.stop(grace=None)


def test_serve_refuses_a_negative_cache_budget():
    out = subprocess.run([sys.executable, "-m", "gramstyle.cli", "serve",
                          "--weights", "random", "--target-cache-mb", "-1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--target-cache-mb: must be >= 0, got -1" in out.stderr


def test_info_names_the_precision_auto_picks():
    out = subprocess.run([sys.executable, "-m", "gramstyle.cli", "info"],
                         capture_output=True, text=True, timeout=120, check=True)
    line = next(line for line in out.stdout.splitlines() if line.startswith("precision"))
    expected = precision.resolve_precision("auto", torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"))
    assert line.startswith(f"precision auto = {expected} on ")
