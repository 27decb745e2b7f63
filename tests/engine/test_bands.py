"""Banded layers (gramstyle.engine.bands) and the stop check (gramstyle.engine.stop)."""

from __future__ import annotations

import pytest
import torch

from gramstyle.engine import bands, stop
from gramstyle.engine.stop import Cancelled


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_banded_layers_match_whole_layers(random_engine, monkeypatch, precision):
    """A large layer runs in bands with a check before each, forward and backward, with the
    whole layer's result."""
    network = random_engine.extractor
    # Its own generator: the input must not depend on which tests ran before.
    x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    layers = ["relu1_1", "relu2_1", "relu3_1", "conv4_1"]

    def run(check):
        pixels = x.clone().requires_grad_(True)
        context = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                   else torch.enable_grad())
        with context:
            feats = network(pixels, layers, check)
            loss = sum((f.float() ** 2).mean() for f in feats.values())
        (grad,) = torch.autograd.grad(loss, pixels)
        return feats, grad

    whole, whole_grad = run(None)
    checks: list[float] = []
    monkeypatch.setattr(bands, "BAND_SECONDS", 2e-4)  # every conv in several bands
    banded, banded_grad = run(checks.append)
    with torch.no_grad():  # without autograd, ReLUs and pools are banded too
        plain = network(x, layers, checks.append)
    tol = 1e-4 if precision == "fp32" else 3e-2
    for name in layers:
        assert banded[name].dtype == whole[name].dtype
        torch.testing.assert_close(banded[name].float(), whole[name].float(), rtol=tol,
                                   atol=tol)
        if precision == "fp32":
            torch.testing.assert_close(plain[name], whole[name], rtol=tol, atol=tol)
    # A ReLU input or a max-pool tie that the summation order moves across zero changes a
    # few gradient entries by a rounding-sized amount, so compare against the gradient's
    # scale.
    scale = whole_grad.abs().max().item()
    torch.testing.assert_close(banded_grad, whole_grad, rtol=0, atol=(tol * 10) * scale)
    assert len(checks) > 100


def test_stop_check_polls_by_work():
    polls = []
    check = stop.StopCheck(lambda: polls.append(1) or len(polls) >= 3,
                            lambda: Cancelled("stop"), interval=0.05)
    for _ in range(4):
        check(0.01)  # 40 ms of work: no poll yet
    assert polls == []
    check(0.02)
    assert polls == [1]
    check(1.0)
    with pytest.raises(Cancelled):
        check(1.0)
