"""Tests of gramstyle.kernels: the fused Gram / style-loss operator and its einsum fallback.

The fused op is checked against the einsum reference evaluated in float64, so every
tolerance below is the fused op's own error. Tolerances (relative to the largest entry):
float32 1e-5 (loss 1e-5 relative), bfloat16 features 1e-2 for G and dF (their outputs are
bf16, ~3 significant digits) and 1e-3 for the loss (G is accumulated and kept in float32).

Every device-dependent test runs on the CPU and, where a GPU and the CUDA kernels are
present, on CUDA (the "cuda" parameter). One list of op inputs (SAMPLES, built by
sample_inputs) feeds the value, gradient, backward-op, gradcheck and opcheck tests; it
includes C = 512 and 640, where the CUDA path splits G into panels and the epilogues read
half of G transposed, and gradients flow in with non-unit upstream values (3 * loss, a
non-symmetric [B,C,C] gradient for gram).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch")

import gramstyle.kernels as K  # noqa: E402
from gramstyle.kernels import reference  # noqa: E402

FUSED = K.backend("cpu") == "cpu"
ops = None
if FUSED:
    from gramstyle.kernels import ops
CUDA = FUSED and ops.WITH_CUDA and torch.cuda.is_available()

needs_fused = pytest.mark.skipif(not FUSED, reason="gramstyle.kernels._C is not built")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a GPU and the CUDA kernels")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

# The lecture's worked example: V V^T with scale 1.
V = [[4.0, 0.0, 3.0, 1.0], [3.0, 0.0, 1.0, 2.0], [4.0, 5.0, 0.0, 3.0]]
VVT = [[26.0, 17.0, 19.0], [17.0, 14.0, 18.0], [19.0, 18.0, 50.0]]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0/0 counts as 0)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    return err / scale if scale > 0 else err


def ref64(features: torch.Tensor, target: torch.Tensor, scale: float):
    """Loss, dL/dF and G from the einsum reference in float64."""
    f = features.detach().double().requires_grad_()
    loss = reference.style_loss(f, target.detach().double(), scale)
    (grad,) = torch.autograd.grad(loss, f)
    return loss.detach(), grad, reference.gram(f.detach(), scale)


def fused_loss_and_grad(features: torch.Tensor, target: torch.Tensor, scale: float | None = None):
    f = features.detach().clone().requires_grad_()
    loss = K.style_loss(f, target, scale)
    (grad,) = torch.autograd.grad(loss, f)
    return loss.detach(), grad


# ------------------------------------------------------------------------------------------
# Sample inputs: one list of op inputs feeds the value, gradient, gradcheck and opcheck tests
# (the pytorch/extension-cpp pattern), so they cannot drift apart.
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSpec:
    """One input case of the op, built on any device by :func:`sample_inputs`.

    ``shape``: the features, [B,C,N] or [B,C,H,W]; ``target``: "cc" ([C,C], broadcast),
    "bcc" ([B,C,C]) or "1cc" ([1,C,C], broadcast); ``block``: the panel width (0: the
    device's default, see panel_width in csrc/gram.cpp); ``scale``: None for 1/(C N).
    """

    name: str
    shape: tuple[int, ...]
    target: str
    block: int = 0
    scale: float | None = None
    channels_last: bool = False
    #: C >= 512: the widths at which the CUDA path splits G into panels (two of C/2 by
    #: default), and the CPU path into four.
    large: bool = False


SAMPLES = [
    SampleSpec("1x3x5-one-gemm", (1, 3, 5), "cc", block=16, scale=0.5),
    SampleSpec("2x4x3x3-4d", (2, 4, 3, 3), "bcc"),
    SampleSpec("1x70x9", (1, 70, 9), "cc"),
    SampleSpec("2x33x17-ragged-panels", (2, 33, 17), "1cc", block=8),
    SampleSpec("2x24x6x5-channels-last", (2, 24, 6, 5), "cc", channels_last=True),
    # Several panels on every device: CUDA two of 256 / 320, CPU four of 128 / 160, and
    # seven ragged ones (6 x 100 + 40) forced. N >= C, so G has full rank.
    SampleSpec("1x512x1024", (1, 512, 1024), "cc", large=True),
    SampleSpec("2x640x30x30-channels-last", (2, 640, 30, 30), "bcc", channels_last=True,
               large=True),
    SampleSpec("1x640x700-block100", (1, 640, 700), "1cc", block=100, large=True),
]
LARGE_SAMPLES = [spec for spec in SAMPLES if spec.large]


@dataclass
class SampleInput:
    """Tensors of one :class:`SampleSpec` on one device (target in the accumulation dtype)."""

    name: str
    features: torch.Tensor
    target: torch.Tensor
    scale: float
    block: int

    @property
    def b(self) -> int:
        return self.features.shape[0]

    @property
    def c(self) -> int:
        return self.features.shape[1]


def _make_sample(spec: SampleSpec, device: str, dtype: torch.dtype,
                 requires_grad: bool) -> SampleInput:
    gen = torch.Generator().manual_seed(zlib.crc32(spec.name.encode()))
    b, c = spec.shape[:2]
    n = math.prod(spec.shape[2:])
    scale = spec.scale if spec.scale is not None else 1.0 / (c * n)
    features = torch.randn(spec.shape, generator=gen, dtype=torch.float64)
    # The target: another Gram plus non-symmetric noise the size of G's off-diagonal entries
    # (s sqrt(N)), so that R = G - A depends on every entry of both: an entry of G read from
    # the wrong panel, or a symmetrised A, changes the loss and the gradient.
    other = torch.randn(b, c, n, generator=gen, dtype=torch.float64)
    target = reference.gram(other, scale) + torch.randn(
        b, c, c, generator=gen, dtype=torch.float64) * scale * math.sqrt(n)
    target = {"cc": target[0], "bcc": target, "1cc": target[:1]}[spec.target]
    features = features.to(device=device, dtype=dtype)
    if spec.channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    # bf16/fp16 features take a float32 target (the op's accumulation dtype).
    target = target.to(device=device, dtype=torch.float64 if dtype == torch.float64
                       else torch.float32)
    return SampleInput(spec.name, features.requires_grad_(requires_grad),
                       target.requires_grad_(requires_grad), scale, spec.block)


def sample_inputs(device: str, *, dtype: torch.dtype = torch.float32,
                  requires_grad: bool = False, specs: list[SampleSpec] = SAMPLES
                  ) -> Iterator[SampleInput]:
    """The op inputs of ``specs`` on ``device``; each test takes the same cases from here."""
    for spec in specs:
        yield _make_sample(spec, device, dtype, requires_grad)


def sample_input(spec: SampleSpec, device: str, **kwargs) -> SampleInput:
    """The one case ``spec`` of :func:`sample_inputs`."""
    return next(sample_inputs(device, specs=[spec], **kwargs))


def as_3d(x: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] or [B,C,N] as [B,C,N] in float64 on the CPU."""
    return x.detach().double().cpu().flatten(2)


def non_symmetric(b: int, c: int, seed: int) -> torch.Tensor:
    """A [B,C,C] float64 upstream gradient / residual, far from symmetric."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, c, generator=gen, dtype=torch.float64) + torch.triu(
        torch.ones(c, c, dtype=torch.float64))


SAMPLE_IDS = {"ids": lambda spec: spec.name}
#: SAMPLES for the costlier checks (opcheck, gradcheck): the large cases are marked slow,
#: which `-m "not slow"` skips (a few seconds each on a 2-core CPU; CI runs them).
SAMPLES_SLOW_LARGE = [pytest.param(spec, id=spec.name, marks=[pytest.mark.slow] * spec.large)
                      for spec in SAMPLES]


# ------------------------------------------------------------------------------------------
# Build and dispatch
# ------------------------------------------------------------------------------------------


def test_extension_is_built() -> None:
    """CI builds the extension before the tests; a silent fallback here would hide that."""
    assert FUSED, (
        "gramstyle.kernels._C did not load (see the warning in the log); build it with "
        "`python setup.py build_ext --inplace` or `pip install --no-build-isolation -e .`"
    )
    assert K.backend() in ("cpu", "cuda")
    assert K.backend("meta") == "einsum"


@pytest.mark.parametrize("path", ["public", "fused-op", "einsum"])
def test_worked_example_gram(path: str) -> None:
    v = torch.tensor([V])
    if path == "public":
        g = K.gram(v, scale=1.0)
    elif path == "fused-op":
        if not FUSED:
            pytest.skip("extension not built")
        g = ops.gram(v, 1.0)
    else:
        g = reference.gram(v, 1.0)
    assert g.tolist() == [VVT]


@needs_cuda
def test_worked_example_gram_cuda() -> None:
    g = K.gram(torch.tensor([V], device="cuda"), scale=1.0)
    assert g.cpu().tolist() == [VVT]


def test_worked_example_default_scale_and_4d() -> None:
    v = torch.tensor([V]).reshape(1, 3, 2, 2)  # [B,C,H,W], N = 4
    expected = torch.tensor([VVT]) / (3 * 4)
    assert torch.allclose(K.gram(v), expected)
    assert torch.allclose(reference.gram(v, 1 / 12), expected)
    # style loss against the unscaled Gram: every entry of R is G/12 - G
    loss = K.style_loss(v, torch.tensor(VVT))
    assert loss.item() == pytest.approx(((expected - torch.tensor(VVT)) ** 2).mean().item())


# ------------------------------------------------------------------------------------------
# Agreement with einsum
# ------------------------------------------------------------------------------------------


@needs_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("n", [1, 7, 4096])
@pytest.mark.parametrize("c", [1, 3, 64, 257])
def test_agrees_with_einsum(c: int, n: int, b: int, device: str) -> None:
    gen = torch.Generator().manual_seed(c * 10007 + n * 31 + b)
    features = torch.randn(b, c, n, generator=gen).to(device)
    target = (torch.randn(c, c, generator=gen) / n).to(device)  # non-symmetric
    scale = 1.0 / (c * n)
    loss, grad = fused_loss_and_grad(features, target)
    ref_loss, ref_grad, ref_gram = ref64(features, target, scale)
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(grad, ref_grad) < 1e-5
    assert rel_err(K.gram(features), ref_gram) < 1e-5


@needs_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block", [1, 16, 33, 50, 64, 100, 1000])
def test_every_panel_width_agrees(block: int, device: str) -> None:
    """Full GEMM, even, ragged and one-column panels all give the same G, loss and dF."""
    gen = torch.Generator().manual_seed(block)
    features = torch.randn(2, 100, 300, generator=gen).to(device)
    target = (torch.randn(2, 100, 100, generator=gen) / 300).to(device)
    ref_loss, ref_grad, ref_gram = ref64(features, target, 0.01)
    assert rel_err(ops.gram(features, 0.01, block), ref_gram) < 1e-5
    f = features.clone().requires_grad_()
    loss = ops.style_loss(f, target, 0.01, block)
    loss.backward()
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(f.grad, ref_grad) < 1e-5


@needs_fused
@pytest.mark.parametrize("device", DEVICES)
def test_non_symmetric_target(device: str) -> None:
    """R + R^T in the backward: a non-symmetric target must still give the exact gradient."""
    features = torch.randn(1, 40, 50, device=device)
    target = torch.triu(torch.randn(40, 40, device=device))  # far from symmetric
    scale = 1.0 / 50  # G ~ identity, the same size as the target
    loss, grad = fused_loss_and_grad(features, target, scale)
    ref_loss, ref_grad, _ = ref64(features, target, scale)
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(grad, ref_grad) < 1e-5
    # The test is sensitive: an op that assumed R symmetric (dF = 4 s/(BCC) R F instead of
    # 2 s/(BCC) (R + R^T) F) would be far off, and the loss sees the antisymmetric part.
    residual = reference.gram(features.double(), scale) - target.double()
    wrong = 4.0 * scale / (40 * 40) * residual @ features.double()
    assert rel_err(wrong, ref_grad) > 1e-1
    sym_loss, _, _ = ref64(features, (target + target.T) / 2, scale)
    assert rel_err(sym_loss, ref_loss) > 1e-1


def _non_contiguous_features(kind: str, device: str) -> torch.Tensor:
    base = torch.randn(2, 24, 10, 12, device=device)
    if kind == "channels_last":
        return base.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        return base[:, ::2, :, ::3]  # [2,12,10,4], no BLAS layout: copied
    if kind == "transposed_hw":
        return base.transpose(2, 3)  # dense but with H and W swapped
    if kind == "channel_slice":
        return base.flatten(2)[:, 3:17, :100]  # row stride 120 > N = 100
    if kind == "expanded":
        return torch.randn(1, 24, 1, device=device).expand(2, 24, 30)
    raise AssertionError(kind)


@needs_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kind", ["channels_last", "strided", "transposed_hw", "channel_slice", "expanded"]
)
def test_non_contiguous(kind: str, device: str) -> None:
    features = _non_contiguous_features(kind, device)
    assert not features.is_contiguous()
    c = features.shape[1]
    target = torch.randn(c, c, device=device).T  # a non-contiguous target too
    scale = 1.0 / features[0, 0].numel()
    loss, grad = fused_loss_and_grad(features, target, scale)
    ref_loss, ref_grad, ref_gram = ref64(features, target, scale)
    assert rel_err(loss, ref_loss) < 1e-5
    assert grad.shape == features.shape
    assert rel_err(grad, ref_grad) < 1e-5
    assert rel_err(K.gram(features, scale), ref_gram) < 1e-5


@needs_fused
def test_channels_last_gradient_keeps_layout() -> None:
    features = torch.randn(1, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    _, grad = fused_loss_and_grad(features, torch.zeros(32, 32))
    assert grad.is_contiguous(memory_format=torch.channels_last)


@needs_fused
def test_bfloat16_channels_last_backward() -> None:
    """The engine's case: bf16 channels_last features (a VGG layer under autocast on CPU),
    which the backward computes as a row-major transposed product (the direct column-major
    bf16 bmm takes an ATen reference path over 1000x slower; see bench/bench_engine.py)."""
    base = torch.randn(1, 64, 128, 128).bfloat16()
    target = torch.randn(64, 64) * 1e-3
    _, expected = fused_loss_and_grad(base.contiguous(), target)
    _, grad = fused_loss_and_grad(base.contiguous(memory_format=torch.channels_last), target)
    assert grad.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(grad, expected) < 1e-2


@needs_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16(device: str, target_dtype: torch.dtype) -> None:
    """bf16 features: G accumulated in float32, compared with float64 on the same inputs."""
    c, n = 64, 2048
    features = torch.randn(2, c, n, device=device).bfloat16()
    target = (features.double() @ features.double().transpose(1, 2) / (c * n))[0]
    target = (target + 0.05 * torch.randn(c, c, device=device, dtype=torch.double)).to(target_dtype)
    loss, grad = fused_loss_and_grad(features, target)
    ref_loss, ref_grad, ref_gram = ref64(features, target, 1.0 / (c * n))
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert rel_err(loss, ref_loss) < 1e-3
    assert rel_err(grad, ref_grad) < 1e-2
    gram = K.gram(features)
    assert gram.dtype == torch.bfloat16
    assert rel_err(gram, ref_gram) < 1e-2


@needs_fused
@pytest.mark.parametrize("device", DEVICES)
def test_float16(device: str) -> None:
    # scale 1 keeps dF well inside float16's range (with 1/(C N) it would underflow to 0
    # on either backend)
    features = (torch.randn(1, 32, 50, device=device) * 0.2).half()
    target = torch.randn(32, 32, device=device)
    loss, grad = fused_loss_and_grad(features, target, 1.0)
    ref_loss, ref_grad, _ = ref64(features, target, 1.0)
    assert grad.dtype == torch.float16
    assert rel_err(loss, ref_loss) < 1e-3
    assert rel_err(grad, ref_grad) < 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["fused", "einsum"])
def test_autocast(path: str, device: str) -> None:
    """Under bf16 autocast both paths run and stay within bf16 accuracy of float64."""
    if path == "fused" and not FUSED:
        pytest.skip("extension not built")
    features = torch.randn(1, 48, 16, 16, device=device)
    target = reference.gram(torch.randn(1, 48, 16, 16, device=device), 1 / (48 * 256))[0]
    f = features.clone().requires_grad_()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        if path == "fused":
            loss = K.style_loss(f, target)
        else:
            loss = reference.style_loss(f, target, 1 / (48 * 256))
    loss.backward()
    ref_loss, ref_grad, _ = ref64(features, target, 1 / (48 * 256))
    assert f.grad.dtype == torch.float32
    assert rel_err(loss, ref_loss) < 2e-2
    assert rel_err(f.grad, ref_grad) < 3e-2


@needs_fused
@pytest.mark.parametrize("device", DEVICES)
def test_target_gradient(device: str) -> None:
    """A target that requires grad gets dA = -2 R / (B C C), summed where broadcast."""
    features = torch.randn(3, 10, 20, dtype=torch.float64, device=device)
    for shape in [(10, 10), (3, 10, 10), (1, 10, 10)]:
        target = torch.randn(*shape, dtype=torch.float64, device=device)
        a1 = target.clone().requires_grad_()
        a2 = target.clone().requires_grad_()
        K.style_loss(features, a1).backward()
        reference.style_loss(features, a2, 1 / 200).backward()
        assert a1.grad.shape == target.shape
        assert rel_err(a1.grad, a2.grad) < 1e-12


def test_target_dtype_is_promoted_by_the_public_call() -> None:
    features = torch.randn(1, 8, 30)
    target = torch.randn(8, 8, dtype=torch.float64)
    expected = reference.style_loss(features.double(), target, 1 / 240)
    assert K.style_loss(features, target).item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------
# Every sample: torch.library's opcheck, values, gradients (non-unit upstream), the backward
# ops on their own, float64 gradcheck; bf16 with several panels
# ------------------------------------------------------------------------------------------


@needs_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("spec", SAMPLES_SLOW_LARGE)
def test_opcheck(spec: SampleSpec, requires_grad: bool, device: str) -> None:
    s = sample_input(spec, device, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.gramstyle.gram.default, (s.features, s.scale, s.block))
    torch.library.opcheck(torch.ops.gramstyle.style_loss.default,
                          (s.features, s.target, s.scale, s.block))
    if not requires_grad:
        residual = non_symmetric(s.b, s.c, 1).float().to(device)
        torch.library.opcheck(
            torch.ops.gramstyle.style_loss_backward.default,
            (torch.tensor(1.5, device=device), residual, s.features, s.scale),
        )
        torch.library.opcheck(torch.ops.gramstyle.gram_backward.default,
                              (residual, s.features, s.scale))


@needs_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SAMPLES, **SAMPLE_IDS)
def test_sample_values(spec: SampleSpec, device: str) -> None:
    """G, R = G - A and the loss of every sample, against float64 einsum on the same inputs."""
    s = sample_input(spec, device)
    loss, residual = torch.ops.gramstyle.style_loss(s.features, s.target, s.scale, s.block)
    gram = ops.gram(s.features, s.scale, s.block)
    ref_gram = reference.gram(as_3d(s.features), s.scale)
    ref_residual = ref_gram - s.target.detach().double().cpu()
    assert gram.shape == residual.shape == (s.b, s.c, s.c)
    assert rel_err(gram, ref_gram) < 1e-5
    assert rel_err(residual, ref_residual) < 1e-5
    assert rel_err(loss, ref_residual.pow(2).mean()) < 1e-5
    # the public call (default panels) agrees as well
    assert rel_err(K.style_loss(s.features, s.target, s.scale), ref_residual.pow(2).mean()) < 1e-5


@needs_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SAMPLES, **SAMPLE_IDS)
def test_sample_gradients(spec: SampleSpec, device: str) -> None:
    """dF and dA of 3 * loss, and dF of gram under a non-symmetric [B,C,C] upstream gradient:
    a backward that ignored the incoming gradient (or assumed it symmetric) is off by O(1)."""
    s = sample_input(spec, device, requires_grad=True)
    (3 * ops.style_loss(s.features, s.target, s.scale, s.block)).backward()
    upstream = non_symmetric(s.b, s.c, 2)
    f = s.features.detach().clone().requires_grad_()
    ops.gram(f, s.scale, s.block).backward(upstream.to(device=device, dtype=f.dtype))

    f64 = s.features.detach().double().cpu().requires_grad_()
    a64 = s.target.detach().double().cpu().requires_grad_()
    (3 * reference.style_loss(f64, a64, s.scale)).backward()
    g64 = f64.detach().clone().requires_grad_()
    reference.gram(g64, s.scale).backward(upstream)
    assert s.features.grad.shape == f.grad.shape == s.features.shape
    assert s.target.grad.shape == s.target.shape
    assert rel_err(s.features.grad, f64.grad) < 1e-5
    assert rel_err(s.target.grad, a64.grad) < 1e-5
    assert rel_err(f.grad, g64.grad) < 1e-5


@needs_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SAMPLES, **SAMPLE_IDS)
def test_sample_backward_ops(spec: SampleSpec, device: str) -> None:
    """The backward ops on their own, against their formulas in float64:
    gram_backward(dG, F, s) = s (dG + dG^T) F and
    style_loss_backward(g, R, F, s) = g * 2 s / (B C C) * (R + R^T) F."""
    s = sample_input(spec, device)
    d_gram, residual = non_symmetric(s.b, s.c, 3), non_symmetric(s.b, s.c, 4)
    f64 = as_3d(s.features)
    grad = torch.ops.gramstyle.gram_backward(
        d_gram.to(device=device, dtype=s.features.dtype), s.features, s.scale)
    expected = s.scale * (d_gram + d_gram.transpose(1, 2)) @ f64
    assert grad.shape == s.features.shape and grad.device.type == device
    assert rel_err(as_3d(grad), expected) < 1e-5
    grad_loss = torch.tensor(1.5, device=device)
    grad = torch.ops.gramstyle.style_loss_backward(
        grad_loss, residual.float().to(device), s.features, s.scale)
    expected = 1.5 * 2 * s.scale / (s.b * s.c * s.c) * (
        residual.float().double() + residual.float().double().transpose(1, 2)) @ f64
    assert grad.shape == s.features.shape
    assert rel_err(as_3d(grad), expected) < 1e-5


@needs_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SAMPLES_SLOW_LARGE)
def test_sample_gradcheck_float64(spec: SampleSpec, device: str) -> None:
    """Finite differences in float64 (fast mode: random directions, so a random non-symmetric
    upstream gradient for gram) for every sample."""
    s = sample_input(spec, device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda f, a: ops.style_loss(f, a, s.scale, s.block), (s.features, s.target),
        fast_mode=True)
    assert torch.autograd.gradcheck(lambda f: ops.gram(f, s.scale, s.block), (s.features,),
                                    fast_mode=True)


@needs_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", LARGE_SAMPLES, **SAMPLE_IDS)
def test_bfloat16_multi_panel(spec: SampleSpec, device: str) -> None:
    """bf16 features with C >= 512: the multi-panel reduced-precision GEMM (MKL bf16 -> fp32
    on the CPU from C = 256, cuBLAS bf16 -> fp32 on CUDA from C = 512) and the epilogue's
    transposed reads, against float64 on the same bf16 values, under 3 * loss and a
    non-symmetric upstream gradient for gram.

    Tolerances, relative to the largest entry: bf16 keeps 8 significant bits, so rounding a
    value to bf16 errs by up to u = 2^-8 = 3.9e-3 of it. G and dF are returned in bf16 (one
    rounding each), and the backward rounds M = alpha (R + R^T) to bf16 before its GEMM
    (errors of at most u per term, of random sign, that do not grow with C); the GEMMs
    accumulate in fp32 (~1e-7). So G and dF are within ~2u: 1e-2 (2.5u). The loss comes
    from the fp32 G and R, never rounded to bf16: 1e-4. A wrong panel or a dropped factor
    errs by O(1).
    """
    s = sample_input(spec, device, dtype=torch.bfloat16, requires_grad=True)
    loss = ops.style_loss(s.features, s.target, s.scale, s.block)
    (3 * loss).backward()
    upstream = non_symmetric(s.b, s.c, 5)
    f = s.features.detach().clone().requires_grad_()
    gram = ops.gram(f, s.scale, s.block)
    gram.backward(upstream.to(device=device, dtype=torch.bfloat16))

    f64 = s.features.detach().double().cpu().requires_grad_()
    a64 = s.target.detach().double().cpu()
    ref_loss = reference.style_loss(f64, a64, s.scale)
    (3 * ref_loss).backward()
    g64 = f64.detach().clone().requires_grad_()
    ref_gram = reference.gram(g64, s.scale)
    # the bf16 upstream gradient, exactly as the op received it
    ref_gram.backward(upstream.bfloat16().double())
    assert loss.dtype == torch.float32 and gram.dtype == s.features.grad.dtype == torch.bfloat16
    assert rel_err(loss, ref_loss) < 1e-4
    assert rel_err(gram, ref_gram) < 1e-2
    assert rel_err(s.features.grad, f64.grad) < 1e-2
    assert rel_err(f.grad, g64.grad) < 1e-2


@needs_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block", [0, 8, 20])  # default, ragged panels (8, 8, 4), full GEMM
def test_gradcheck_float64(block: int, device: str) -> None:
    gen = torch.Generator().manual_seed(block)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(
            device).requires_grad_()

    features, target, batched = rand(2, 20, 6), rand(20, 20), rand(2, 20, 20)
    assert torch.autograd.gradcheck(
        lambda f, a: ops.style_loss(f, a, 0.1, block), (features, target), fast_mode=True
    )
    assert torch.autograd.gradcheck(
        lambda f, a: ops.style_loss(f, a, 0.1, block), (features, batched), fast_mode=True
    )
    assert torch.autograd.gradcheck(lambda f: ops.gram(f, 0.1, block), (features,), fast_mode=True)
    # one exhaustive (slow-mode) check on a small 4-D case through the public call
    four_d, small = rand(1, 5, 3, 4), rand(5, 5)
    assert torch.autograd.gradcheck(lambda f, a: K.style_loss(f, a), (four_d, small))


@needs_fused
def test_torch_compile_fullgraph() -> None:
    """The fake kernels let the op trace into one graph (aot_eager: no C++ codegen)."""

    def step(f: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return K.style_loss(f, a, 0.01)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    features = torch.randn(1, 16, 4, 4, requires_grad=True)
    target = torch.randn(16, 16)
    loss = compiled(features, target)
    loss.backward()
    _, ref_grad, _ = ref64(features, target, 0.01)
    assert rel_err(features.grad, ref_grad) < 1e-5


# ------------------------------------------------------------------------------------------
# Bad input: the same exception type and message from the fused op and the einsum path
# ------------------------------------------------------------------------------------------

BAD_INPUTS = [
    # (features, target, exception, message fragment)
    pytest.param(
        (3, 4),
        (3, 3),
        ValueError,
        "features must be [B,C,H,W] or [B,C,N], got a 2-D",
        id="features-2d",
    ),
    pytest.param((1, 3, 2, 2, 2), (3, 3), ValueError, "got a 5-D tensor", id="features-5d"),
    pytest.param(
        (1, 3, 4), (3,), ValueError, "target must be [C,C] or [B,C,C], got a 1-D", id="target-1d"
    ),
    pytest.param((1, 3, 4), (1, 1, 3, 3), ValueError, "got a 4-D tensor", id="target-4d"),
    pytest.param((1, 3, 4), (4, 4), ValueError, "but features have C=3 channels", id="c-mismatch"),
    pytest.param((1, 3, 4), (3, 4), ValueError, "but features have C=3 channels", id="not-square"),
    pytest.param(
        (2, 3, 4),
        (3, 3, 3),
        ValueError,
        "target batch 3 does not match features batch 2",
        id="batch-mismatch",
    ),
    pytest.param((1, 0, 4), (0, 0), ValueError, "features must not be empty", id="empty-c"),
    pytest.param((1, 3, 0), (3, 3), ValueError, "features must not be empty", id="empty-n"),
    pytest.param((0, 3, 4), (3, 3), ValueError, "features must not be empty", id="empty-b"),
]


@pytest.mark.parametrize("fshape, tshape, exc, message", BAD_INPUTS)
@pytest.mark.parametrize("path", ["fused-op", "public", "einsum"])
def test_bad_input(path: str, fshape: tuple, tshape: tuple, exc: type, message: str) -> None:
    features, target = torch.randn(*fshape), torch.randn(*tshape)
    with pytest.raises(exc, match=_escape(message)):
        if path == "fused-op":
            if not FUSED:
                pytest.skip("extension not built")
            torch.ops.gramstyle.style_loss(features, target, 1.0, 0)
        elif path == "public":
            K.style_loss(features, target)
        else:
            reference.style_loss(features, target, 1.0)


def _escape(message: str) -> str:
    import re

    return re.escape(message)


@needs_fused
def test_bad_dtypes() -> None:
    with pytest.raises(TypeError, match="features must be float32, float64, bfloat16 or float16"):
        torch.ops.gramstyle.style_loss(
            torch.ones(1, 2, 3, dtype=torch.int64), torch.ones(2, 2), 1.0
        )
    with pytest.raises(TypeError, match="features must be float32, float64, bfloat16 or float16"):
        K.gram(torch.ones(1, 2, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="target dtype Double does not match features dtype Float"):
        torch.ops.gramstyle.style_loss(
            torch.ones(1, 2, 3), torch.ones(2, 2, dtype=torch.double), 1.0
        )
    with pytest.raises(
        TypeError, match="target dtype BFloat16 does not match features dtype Float"
    ):
        torch.ops.gramstyle.style_loss(torch.ones(1, 2, 3), torch.ones(2, 2).bfloat16(), 1.0)
    with pytest.raises(ValueError, match=r"residual must be \[B,C,C\] = \[1,2,2\]"):
        torch.ops.gramstyle.style_loss_backward(
            torch.tensor(1.0), torch.ones(1, 3, 3), torch.ones(1, 2, 3), 1.0
        )


@pytest.mark.parametrize("path", ["public", "einsum"])
def test_target_on_another_device(path: str) -> None:
    features, target = torch.randn(1, 3, 4), torch.randn(3, 3, device="meta")
    with pytest.raises(ValueError, match="target is on meta but features are on cpu"):
        if path == "public":
            K.style_loss(features, target)
        else:
            reference.style_loss(features, target, 1.0)


@needs_cuda
def test_target_on_another_device_cuda_op() -> None:
    with pytest.raises(ValueError, match="target is on cpu but features are on cuda"):
        torch.ops.gramstyle.style_loss(torch.randn(1, 3, 4, device="cuda"), torch.randn(3, 3), 1.0)


# ------------------------------------------------------------------------------------------
# Fallback
# ------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, logging, sys
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if "block_extension" in sys.argv:
        class Block:  # make `import gramstyle.kernels._C` fail like a broken build would
            def find_spec(self, name, path=None, target=None):
                if name == "gramstyle.kernels._C":
                    raise ImportError("simulated broken build")
        sys.meta_path.insert(0, Block())
    import torch
    import gramstyle.kernels as K
    torch.manual_seed(0)
    f = torch.randn(2, 5, 6, 7, requires_grad=True)
    a = torch.randn(5, 5)
    loss = K.style_loss(f, a)
    loss.backward()
    K.gram(f)  # a second call must not warn again
    v = torch.tensor([[[4., 0, 3, 1], [3, 0, 1, 2], [4, 5, 0, 3]]])
    print(json.dumps({
        "backend": K.backend(),
        "ops_loaded": "gramstyle.kernels.ops" in sys.modules,
        "worked_example": K.gram(v, scale=1.0).tolist(),
        "loss": loss.item(),
        "grad_sum": f.grad.double().abs().sum().item(),
    }))
    """
)


def _run_child(env_kernel: str | None, *args: str) -> tuple[dict, str]:
    env = dict(os.environ)
    env.pop("GRAMSTYLE_KERNEL", None)
    if env_kernel is not None:
        env["GRAMSTYLE_KERNEL"] = env_kernel
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _expected_child_values() -> tuple[float, float]:
    gen = torch.Generator().manual_seed(0)  # the child's draws, from torch.manual_seed(0)
    f = torch.randn(2, 5, 6, 7, generator=gen).double().requires_grad_()
    a = torch.randn(5, 5, generator=gen).double()
    loss = reference.style_loss(f, a, 1 / (5 * 42))
    loss.backward()
    return loss.item(), f.grad.abs().sum().item()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["env-einsum", "broken-build", "default"])
def test_backend_selection_in_subprocess(mode: str) -> None:
    if mode == "env-einsum":
        result, stderr = _run_child("einsum")
        assert result["backend"] == "einsum" and not result["ops_loaded"]
        assert "could not be loaded" not in stderr
    elif mode == "broken-build":
        result, stderr = _run_child(None, "block_extension")
        assert result["backend"] == "einsum" and not result["ops_loaded"]
        assert stderr.count("falling back to the einsum path") == 1  # warned once
        assert "simulated broken build" in stderr
    else:
        if not FUSED:
            pytest.skip("extension not built")
        result, _ = _run_child(None)
        assert result["backend"] in ("cpu", "cuda") and result["ops_loaded"]
    assert result["worked_example"] == [VVT]
    loss, grad_sum = _expected_child_values()
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["grad_sum"] == pytest.approx(grad_sum, rel=1e-4)


# ------------------------------------------------------------------------------------------
# A small optimisation: both backends give the same loss trajectory and result
# ------------------------------------------------------------------------------------------


@needs_fused
def test_optimisation_agrees_between_backends() -> None:
    """Gradient descent on an image through a fixed conv layer, with the style loss from
    the fused op and from einsum: the losses and the final image agree."""
    gen = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(3, 32, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.2)
        conv.bias.zero_()
        style = torch.relu(conv(torch.rand(1, 3, 24, 24, generator=gen)))
        target = K.gram(style)[0]
    start = torch.rand(1, 3, 24, 24, generator=gen)

    def optimise(loss_fn) -> tuple[list[float], torch.Tensor]:
        image = start.clone().requires_grad_()
        opt = torch.optim.Adam([image], lr=0.05)
        losses = []
        for _ in range(15):
            opt.zero_grad()
            loss = loss_fn(torch.relu(conv(image)), target) * 1e3
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, image.detach()

    fused_losses, fused_image = optimise(lambda f, a: ops.style_loss(f, a, 1 / (32 * 576)))
    ref_losses, ref_image = optimise(lambda f, a: reference.style_loss(f, a, 1 / (32 * 576)))
    assert fused_losses[-1] < 0.5 * fused_losses[0]  # it does optimise
    assert fused_losses == pytest.approx(ref_losses, rel=1e-3)
    assert rel_err(fused_image, ref_image) < 1e-3


# ------------------------------------------------------------------------------------------
# setup.py's kernel_extensions(): skip without torch, CPU by default, CUDA only when asked
# ------------------------------------------------------------------------------------------

_SETUP_CHILD = textwrap.dedent(
    """
    import ast, json, os, sys
    if "no_torch" in sys.argv:
        class Block:  # a client-only environment: torch is not importable
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("no torch here")
        sys.meta_path.insert(0, Block())
    source = open(sys.argv[1]).read()
    tree = ast.parse(source)
    fn = next(n for n in tree.body if getattr(n, "name", None) == "kernel_extensions")
    namespace = {"os": os}
    exec(compile(ast.Module([fn], []), "setup.py", "exec"), namespace)
    ext_modules, cmdclass = namespace["kernel_extensions"]()
    print(json.dumps({
        "names": [e.name for e in ext_modules],
        "sources": [list(e.sources) for e in ext_modules],
        "cmdclass": sorted(cmdclass),
    }))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no-torch", "cpu", "force-cuda-0"])
def test_setup_kernel_extensions(case: str) -> None:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    setup_py = os.path.join(repo, "setup.py")
    env = dict(os.environ)
    env.pop("FORCE_CUDA", None)
    if case == "force-cuda-0":
        env["FORCE_CUDA"] = "0"
    args = [setup_py] + (["no_torch"] if case == "no-torch" else [])
    proc = subprocess.run(
        [sys.executable, "-c", _SETUP_CHILD, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if case == "no-torch":
        assert result == {"names": [], "sources": [], "cmdclass": []}
        assert "building without gramstyle.kernels._C" in proc.stdout
        return
    assert result["names"] == ["gramstyle.kernels._C"]
    assert result["cmdclass"] == ["build_ext"]
    cuda_sources = [s for s in result["sources"][0] if s.endswith(".cu")]
    if case == "force-cuda-0" or not torch.cuda.is_available():
        assert cuda_sources == []  # no GPU here: CPU only unless FORCE_CUDA=1
