"""The fused op with per-position weights (guided Gram matrices): G = s F diag(w^2) F^T.

Every case of test_kernels' SAMPLES (through its sample_inputs generator) gets weights here:
soft values in [0, 1] with a block of zeros (a masked-out region), as [N] on some samples
and [B,N] on the others. The fused op is checked against the einsum reference and the
formula in float64, so the tolerances are the op's own error (the same as test_kernels':
1e-5 relative to the largest entry in float32, 1e-2 for bf16 outputs).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch")

from test_kernels import (  # noqa: E402  (the shared sample generator, tests/**/test_kernels.py)
    DEVICES,
    LARGE_SAMPLES,
    SAMPLE_IDS,
    SAMPLES,
    SAMPLES_SLOW_LARGE,
    SampleInput,
    SampleSpec,
    as_3d,
    needs_fused,
    non_symmetric,
    rel_err,
    sample_inputs,
)

import gramstyle.kernels as K  # noqa: E402
from gramstyle.kernels import reference  # noqa: E402

ops = None
if K.backend("cpu") == "cpu":
    from gramstyle.kernels import ops


@dataclass
class WeightedSample:
    """A :class:`SampleInput` with weights: [N] for even-indexed samples, [B,N] for odd."""

    s: SampleInput
    weights: torch.Tensor


def _weights(spec: SampleSpec, index: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(spec.name.encode()) + 1)
    b, n = spec.shape[0], math.prod(spec.shape[2:])
    w = torch.rand(b if index % 2 else 1, n, generator=gen, dtype=torch.float64)
    w[:, : n // 4] = 0  # a region the weights leave out entirely
    w = w if index % 2 else w[0]
    return w.to(device=device, dtype=dtype)


def weighted_sample_inputs(device: str, *, dtype: torch.dtype = torch.float32,
                           requires_grad: bool = False, specs: list[SampleSpec] = SAMPLES
                           ) -> Iterator[WeightedSample]:
    """test_kernels' sample_inputs, each with weights in the accumulation dtype."""
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    for spec, sample in zip(specs, sample_inputs(device, dtype=dtype, requires_grad=requires_grad,
                                                 specs=specs), strict=True):
        yield WeightedSample(sample, _weights(spec, SAMPLES.index(spec), device, wdtype))


def weighted_sample(spec: SampleSpec, device: str, **kwargs) -> WeightedSample:
    return next(weighted_sample_inputs(device, specs=[spec], **kwargs))


def formula_gram(features: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """s F diag(w^2) F^T in float64, written out independently of reference.gram."""
    f = as_3d(features)
    w2 = weights.detach().double().cpu().reshape(-1, f.shape[2]).square()
    return torch.einsum("bcn,bn,bdn->bcd", f, w2.expand(f.shape[0], -1), f) * scale


# ------------------------------------------------------------------------------------------
# The raw op, every sample
# ------------------------------------------------------------------------------------------


@needs_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("spec", SAMPLES_SLOW_LARGE)
def test_weighted_opcheck(spec: SampleSpec, requires_grad: bool, device: str) -> None:
    ws = weighted_sample(spec, device, requires_grad=requires_grad)
    s, w = ws.s, ws.weights
    torch.library.opcheck(torch.ops.gramstyle.gram.default, (s.features, s.scale, s.block, w))
    torch.library.opcheck(torch.ops.gramstyle.style_loss.default,
                          (s.features, s.target, s.scale, s.block, w))
    if not requires_grad:
        residual = non_symmetric(s.b, s.c, 1).float().to(device)
        torch.library.opcheck(
            torch.ops.gramstyle.style_loss_backward.default,
            (torch.tensor(1.5, device=device), residual, s.features, s.scale, w),
        )
        torch.library.opcheck(torch.ops.gramstyle.gram_backward.default,
                              (residual, s.features, s.scale, w))


@needs_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SAMPLES, **SAMPLE_IDS)
def test_weighted_values(spec: SampleSpec, device: str) -> None:
    """G, R and the loss against the formula and the einsum reference in float64."""
    ws = weighted_sample(spec, device)
    s, w = ws.s, ws.weights
    loss, residual = torch.ops.gramstyle.style_loss(s.features, s.target, s.scale, s.block, w)
    gram = ops.gram(s.features, s.scale, s.block, w)
    expected = formula_gram(s.features, w, s.scale)
    ref_gram = reference.gram(as_3d(s.features), s.scale, w.double().cpu())
    ref_residual = expected - s.target.double().cpu()
    assert rel_err(ref_gram, expected) < 1e-12
    assert gram.shape == residual.shape == (s.b, s.c, s.c)
    assert rel_err(gram, expected) < 1e-5
    assert rel_err(residual, ref_residual) < 1e-5
    assert rel_err(loss, ref_residual.pow(2).mean()) < 1e-5
    # the weights matter: the unweighted Gram is far away
    assert rel_err(ops.gram(s.features, s.scale, s.block), expected) > 0.05


@needs_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SAMPLES, **SAMPLE_IDS)
def test_weighted_gradients(spec: SampleSpec, device: str) -> None:
    """dF and dA of 3 * loss and dF of gram under a non-symmetric upstream gradient, against
    autograd through the float64 einsum reference (which scales dF by w^2 on its own)."""
    ws = weighted_sample(spec, device, requires_grad=True)
    s, w = ws.s, ws.weights
    (3 * ops.style_loss(s.features, s.target, s.scale, s.block, w)).backward()
    upstream = non_symmetric(s.b, s.c, 2)
    f = s.features.detach().clone().requires_grad_()
    ops.gram(f, s.scale, s.block, w).backward(upstream.to(device=device, dtype=f.dtype))

    w64 = w.double().cpu()
    f64 = s.features.detach().double().cpu().requires_grad_()
    a64 = s.target.detach().double().cpu().requires_grad_()
    (3 * reference.style_loss(f64, a64, s.scale, w64)).backward()
    g64 = f64.detach().clone().requires_grad_()
    reference.gram(g64, s.scale, w64).backward(upstream)
    assert s.features.grad.shape == f.grad.shape == s.features.shape
    assert rel_err(s.features.grad, f64.grad) < 1e-5
    assert rel_err(s.target.grad, a64.grad) < 1e-5
    assert rel_err(f.grad, g64.grad) < 1e-5
    # positions with zero weight get no gradient at all
    zero = (w64.reshape(-1, w64.shape[-1]) == 0).expand(s.b, -1)
    assert as_3d(s.features.grad).permute(0, 2, 1)[zero].abs().max().item() == 0.0


@needs_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SAMPLES, **SAMPLE_IDS)
def test_weighted_backward_ops(spec: SampleSpec, device: str) -> None:
    """gram_backward(dG, F, s, w) = s (dG + dG^T) F diag(w^2) and
    style_loss_backward(g, R, F, s, w) = g 2 s / (B C C) (R + R^T) F diag(w^2)."""
    ws = weighted_sample(spec, device)
    s, w = ws.s, ws.weights
    d_gram, residual = non_symmetric(s.b, s.c, 3), non_symmetric(s.b, s.c, 4)
    f64 = as_3d(s.features)
    w2 = w.double().cpu().reshape(-1, 1, f64.shape[2]).square()
    grad = torch.ops.gramstyle.gram_backward(
        d_gram.to(device=device, dtype=s.features.dtype), s.features, s.scale, w)
    expected = s.scale * (d_gram + d_gram.transpose(1, 2)) @ f64 * w2
    assert grad.shape == s.features.shape and grad.device.type == device
    assert rel_err(as_3d(grad), expected) < 1e-5
    grad = torch.ops.gramstyle.style_loss_backward(
        torch.tensor(1.5, device=device), residual.float().to(device), s.features, s.scale, w)
    r = residual.float().double()
    expected = 1.5 * 2 * s.scale / (s.b * s.c * s.c) * (r + r.transpose(1, 2)) @ f64 * w2
    assert rel_err(as_3d(grad), expected) < 1e-5


@needs_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SAMPLES_SLOW_LARGE)
def test_weighted_gradcheck_float64(spec: SampleSpec, device: str) -> None:
    ws = weighted_sample(spec, device, dtype=torch.float64, requires_grad=True)
    s, w = ws.s, ws.weights
    assert torch.autograd.gradcheck(
        lambda f, a: ops.style_loss(f, a, s.scale, s.block, w), (s.features, s.target),
        fast_mode=True)
    assert torch.autograd.gradcheck(lambda f: ops.gram(f, s.scale, s.block, w), (s.features,),
                                    fast_mode=True)


@needs_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", LARGE_SAMPLES, **SAMPLE_IDS)
def test_weighted_bfloat16(spec: SampleSpec, device: str) -> None:
    """bf16 features with weights: F diag(w) and dF * w^2 are rounded to bf16 once more than
    without weights (u = 2^-8 each), still within 1e-2 of float64 on the same bf16 values;
    the loss, from the fp32 G, within 1e-3."""
    ws = weighted_sample(spec, device, dtype=torch.bfloat16, requires_grad=True)
    s, w = ws.s, ws.weights
    loss = ops.style_loss(s.features, s.target, s.scale, s.block, w)
    loss.backward()
    f64 = s.features.detach().double().cpu().requires_grad_()
    ref = reference.style_loss(f64, s.target.detach().double().cpu(), s.scale, w.double().cpu())
    ref.backward()
    assert loss.dtype == torch.float32 and s.features.grad.dtype == torch.bfloat16
    assert rel_err(loss, ref) < 1e-3
    assert rel_err(ops.gram(s.features.detach(), s.scale, s.block, w),
                   formula_gram(s.features, w, s.scale)) < 1e-2
    assert rel_err(s.features.grad, f64.grad) < 1e-2


# ------------------------------------------------------------------------------------------
# The public call: default normalisation, both backends, errors
# ------------------------------------------------------------------------------------------


@pytest.fixture(params=["fused", "einsum"])
def backend(request, monkeypatch) -> str:
    if request.param == "fused":
        if ops is None:
            pytest.skip("gramstyle.kernels._C is not built")
    else:
        monkeypatch.setattr(K, "_fused_for", lambda device: None)
    return request.param


def _case(b: int = 2, c: int = 6, h: int = 4, w: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    weights = torch.rand(b, h * w, generator=gen, dtype=torch.float64)
    target = torch.randn(c, c, generator=gen, dtype=torch.float64)
    return features, weights, target


def test_default_scale_is_per_item_mean_over_weights(backend: str) -> None:
    """scale_b = 1 / (C sum_k w_bk^2): the Gram is the weighted mean of F_k F_k^T."""
    features, weights, target = _case()
    f3 = features.flatten(2)
    w2 = weights.square()
    expected = torch.einsum("bcn,bn,bdn->bcd", f3, w2, f3) / (6 * w2.sum(1))[:, None, None]
    assert rel_err(K.gram(features, weights=weights), expected) < 1e-12
    assert rel_err(K.style_loss(features, target, weights=weights),
                   (expected - target).pow(2).mean()) < 1e-12
    # an explicit scale is used as given for every item
    assert rel_err(K.gram(features, 0.25, weights=weights),
                   torch.einsum("bcn,bn,bdn->bcd", f3, w2, f3) * 0.25) < 1e-12
    # weights scaled by any factor give the same default-normalised Gram
    assert rel_err(K.gram(features, weights=7 * weights), expected) < 1e-12


def test_all_ones_weights_equal_no_weights(backend: str) -> None:
    features, _, target = _case(seed=1)
    ones = torch.ones(20, dtype=torch.float64)
    assert rel_err(K.gram(features, weights=ones), K.gram(features)) < 1e-14
    assert rel_err(K.style_loss(features, target, weights=ones),
                   K.style_loss(features, target)) < 1e-14
    f32 = features.float()
    assert rel_err(K.style_loss(f32, target.float(), weights=ones.float()),
                   K.style_loss(f32, target.float())) < 1e-6


def test_zero_weights_give_a_zero_gram(backend: str) -> None:
    features, weights, _ = _case(seed=2)
    weights[1] = 0
    gram = K.gram(features, weights=weights)
    assert torch.isfinite(gram).all()
    assert gram[1].abs().max().item() == 0.0 and gram[0].abs().max().item() > 0


def test_backends_agree_through_the_public_call(monkeypatch) -> None:
    if ops is None:
        pytest.skip("gramstyle.kernels._C is not built")
    features, weights, target = _case(seed=3)
    features = features.float().requires_grad_()
    fused = K.style_loss(features, target.float(), weights=weights[0].float())
    (fused_grad,) = torch.autograd.grad(fused, features)
    monkeypatch.setattr(K, "_fused_for", lambda device: None)
    einsum = K.style_loss(features, target.float(), weights=weights[0].float())
    (einsum_grad,) = torch.autograd.grad(einsum, features)
    assert rel_err(fused, einsum) < 1e-5
    assert rel_err(fused_grad, einsum_grad) < 1e-5


@pytest.mark.parametrize(
    ("wshape", "exc", "message"),
    [
        ((2, 1, 20), ValueError, "gramstyle.style_loss: weights must be [N] or [B,N], got a 3-D"),
        ((19,), ValueError, "gramstyle.style_loss: weights have shape [19] but features have "
                            "N=20 positions"),
        ((3, 20), ValueError, "gramstyle.style_loss: weights batch 3 does not match features "
                              "batch 2"),
    ],
)
@pytest.mark.parametrize("scale", [None, 0.5])
def test_bad_weights(backend: str, wshape: tuple, exc: type, message: str,
                     scale: float | None) -> None:
    features, _, target = _case()
    with pytest.raises(exc, match=_escape(message)):
        K.style_loss(features, target, scale, weights=torch.ones(wshape, dtype=torch.float64))
    with pytest.raises(exc, match=_escape(message.replace("style_loss", "gram"))):
        K.gram(features, scale, weights=torch.ones(wshape, dtype=torch.float64))


@pytest.mark.parametrize("scale", [None, 0.5])
def test_bad_weight_dtype_and_grad(backend: str, scale: float | None) -> None:
    features, weights, target = _case()
    with pytest.raises(TypeError, match="gramstyle.gram: weights must be a floating tensor"):
        K.gram(features, scale, weights=torch.ones(2, 20, dtype=torch.int64))
    with pytest.raises(ValueError, match="gramstyle.style_loss: weights must not require grad"):
        K.style_loss(features, target, scale, weights=weights.requires_grad_())


def _escape(message: str) -> str:
    import re

    return re.escape(message)


@needs_fused
def test_weighted_torch_compile_fullgraph() -> None:
    """The fake kernels take the weights: the weighted op traces into one graph."""

    def step(f: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return K.style_loss(f, a, 0.01, weights=w)

    features, weights, target = _case(seed=4)
    features, weights, target = features.float(), weights.float(), target.float()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    f1 = features.clone().requires_grad_()
    f2 = features.clone().requires_grad_()
    eager = step(f1, target, weights)
    traced = compiled(f2, target, weights)
    eager.backward()
    traced.backward()
    assert rel_err(traced, eager) < 1e-6
    assert rel_err(f2.grad, f1.grad) < 1e-6
