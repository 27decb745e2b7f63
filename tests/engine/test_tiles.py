"""The tiled objective (gramstyle.engine.tiles) gives the untiled loss and gradient.

Tolerances (fp32): the total loss within 1e-5 relative, every per-layer term within 1e-5
relative, and the gradient within 1e-4 relative L2 error (the issue's target is 1e-3); the
tiled and untiled computations differ only in float summation order (measured: about 1e-7
on the loss, 1e-6 on the gradient). bf16: the network runs in bf16 (8 mantissa bits,
relative rounding 2^-9 = 2e-3 per operation) in both, on the same inputs, but a tile's
convolutions may round differently from the whole image's, so the loss is held to 1e-3 and
the gradient to 2e-2 (measured: 5e-3).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from gramstyle.engine import StyleTransfer, tiles
from gramstyle.engine.objective import Objective
from gramstyle.engine.stop import Cancelled
from gramstyle.options import StyleOptions

#: Down to relu5_1 (stride 16, halo 64 px): the whole mechanism, but each tile is large.
LAYERS = dict(content_layers=("relu2_2", "relu4_2"),
              style_layers=("relu1_1", "relu3_1", "relu5_1"))
#: Down to relu3_1 (stride 4, halo 12 px): small tiles, fast tests.
SHALLOW = dict(content_layers=("relu2_2",), style_layers=("relu1_1", "relu2_1", "relu3_1"))


@pytest.fixture(scope="module")
def vgg16_random() -> StyleTransfer:
    return StyleTransfer(arch="vgg16", weights="random", device="cpu")


def _objective(engine: StyleTransfer, images, width: int, height: int, **options
               ) -> Objective:
    opts = engine.validate(StyleOptions(**{"size": max(width, height), "precision": "fp32",
                                           "tv_weight": 3.0, **LAYERS, **options}))
    content = Image.open(images["cat"]).convert("RGB")
    style = Image.open(images["starry"]).convert("RGB")
    return Objective.build(engine.network(opts.precision), [content], [style], opts,
                           size=(width, height))


def _loss_and_gradient(objective: Objective, x: torch.Tensor, tile: int = 0):
    objective = dataclasses.replace(objective, tile=tile)
    x = x.clone().requires_grad_(True)
    total, terms = objective.evaluate_terms(x)
    total.backward()
    return terms.losses(), x.grad


def _assert_match(expected, got, loss_rtol: float, grad_rtol: float) -> None:
    (losses, grad), (tiled, tiled_grad) = expected, got
    assert tiled.total == pytest.approx(losses.total, rel=loss_rtol)
    for kind in ("content_layers", "style_layers"):
        want, have = getattr(losses, kind), getattr(tiled, kind)
        assert have.keys() == want.keys()
        for name in want:
            assert have[name] == pytest.approx(want[name], rel=loss_rtol), (kind, name)
    assert tiled.tv == pytest.approx(losses.tv, rel=loss_rtol)
    error = ((tiled_grad - grad).norm() / grad.norm()).item()
    assert error < grad_rtol, f"gradient relative L2 error {error:.2e}"


def test_receptive_field_is_computed_from_the_modules(vgg16_random, random_engine):
    field = tiles.receptive_field(vgg16_random.extractor, ["relu5_1"])
    # VGG16 to relu5_1: a 132 px field, 58 px read on either side, stride 16, halo 64.
    assert (field.size, field.stride, field.before, field.after, field.halo) == (
        132, 16, 58, 58, 64)
    assert tiles.receptive_field(random_engine.extractor, ["relu5_1"]).size == 156  # VGG19
    shallow = tiles.receptive_field(vgg16_random.extractor, ["relu1_1", "relu1_2"])
    assert (shallow.size, shallow.stride, shallow.before, shallow.halo) == (5, 1, 2, 2)
    pooled = tiles.receptive_field(vgg16_random.extractor, ["pool1"])
    assert (pooled.size, pooled.stride, pooled.before, pooled.after, pooled.halo) == (
        6, 2, 2, 2, 2)


@pytest.mark.parametrize("height, width, tile", [(100, 136, 32), (128, 128, 48), (40, 17, 64),
                                                 (57, 300, 40)])
def test_plan_interiors_partition_the_image_at_stride_offsets(vgg16_random, height, width,
                                                              tile):
    field = tiles.receptive_field(vgg16_random.extractor, ["relu3_1"])  # stride 4, halo 12
    plan = tiles.plan(height, width, tile, field)
    covered = np.zeros((height, width), int)
    for t in plan:
        covered[t.y0:t.y1, t.x0:t.x1] += 1
        assert t.y0 % field.stride == 0 and t.x0 % field.stride == 0
        assert (t.ty0, t.tx0) == (max(0, t.y0 - field.halo), max(0, t.x0 - field.halo))
        assert (t.ty1, t.tx1) == (min(height, t.y1 + field.halo),
                                  min(width, t.x1 + field.halo))
        side = tile // 4 * 4
        assert min(height, side // 2) <= t.y1 - t.y0 <= max(height // 2, side * 3 // 2)
        assert min(width, side // 2) <= t.x1 - t.x0 <= max(width // 2, side * 3 // 2)
    assert (covered == 1).all()


def test_tiled_loss_and_gradient_match_untiled_3x4_shallow(vgg16_random, images):
    """A 136 x 100 image (not a multiple of the stride) in 3 x 4 tiles of 32 px."""
    objective = _objective(vgg16_random, images, 136, 100, **SHALLOW)
    assert len(tiles.plan(100, 136, 32, tiles.receptive_field(
        vgg16_random.extractor, list(objective.layers)))) == 12
    x = torch.rand(1, 3, 100, 136, generator=torch.Generator().manual_seed(1))
    _assert_match(_loss_and_gradient(objective, x), _loss_and_gradient(objective, x, 32),
                  1e-5, 1e-4)


def test_a_halo_below_the_field_breaks_exactness(vgg16_random, images, monkeypatch):
    """The test above can fail: a halo of 4 px instead of the field's 12 px."""
    objective = _objective(vgg16_random, images, 136, 100, **SHALLOW)
    x = torch.rand(1, 3, 100, 136, generator=torch.Generator().manual_seed(1))
    expected = _loss_and_gradient(objective, x)
    real = tiles.receptive_field
    monkeypatch.setattr(tiles, "receptive_field", lambda *a: dataclasses.replace(
        real(*a), before=4, after=4))
    losses, grad = _loss_and_gradient(objective, x, 32)
    assert ((grad - expected[1]).norm() / expected[1].norm()).item() > 1e-2


@pytest.mark.slow
def test_tiled_loss_and_gradient_match_untiled_2x2_odd_size(vgg16_random, images):
    """A 136 x 100 image (not a multiple of the stride 16) in 2 x 2 tiles."""
    objective = _objective(vgg16_random, images, 136, 100)
    assert len(tiles.plan(100, 136, 64, tiles.receptive_field(
        vgg16_random.extractor, list(objective.layers)))) == 4
    x = torch.rand(1, 3, 100, 136, generator=torch.Generator().manual_seed(1))
    _assert_match(_loss_and_gradient(objective, x), _loss_and_gradient(objective, x, 64),
                  1e-5, 1e-4)


@pytest.mark.slow
def test_tiled_matches_untiled_on_real_weights_3x3_tiles(hed_engine, images):
    """The shared HED VGG16, default layers, 112 x 96 px in 3 x 4 tiles of 32 px."""
    objective = _objective(hed_engine, images, 112, 96,
                           content_layers=("relu4_2",),
                           style_layers=("relu1_1", "relu2_1", "relu3_1", "relu4_1",
                                         "relu5_1"))
    x = torch.rand(1, 3, 96, 112, generator=torch.Generator().manual_seed(2))
    assert len(tiles.plan(96, 112, 32, tiles.receptive_field(
        hed_engine.extractor, list(objective.layers)))) == 12
    _assert_match(_loss_and_gradient(objective, x), _loss_and_gradient(objective, x, 32),
                  1e-5, 1e-4)


@pytest.mark.slow
def test_tiled_matches_untiled_in_bf16(vgg16_random, images):
    objective = _objective(vgg16_random, images, 136, 100, precision="bf16", **SHALLOW)
    x = torch.rand(1, 3, 100, 136, generator=torch.Generator().manual_seed(3))
    _assert_match(_loss_and_gradient(objective, x), _loss_and_gradient(objective, x, 32),
                  1e-3, 2e-2)


def test_tiled_targets_match_untiled(vgg16_random, images):
    """Content feature maps and style Grams built tile by tile (tile set)."""
    whole = _objective(vgg16_random, images, 136, 100, **SHALLOW)
    tiled = _objective(vgg16_random, images, 136, 100, tile=32, **SHALLOW)
    assert tiled.tile == 32 and whole.tile == 0
    for name, loss in whole.content.losses.items():
        torch.testing.assert_close(tiled.content.losses[name].target.mean, loss.target.mean,
                                   rtol=1e-5, atol=1e-6)
    for name, loss in whole.style.losses.items():
        torch.testing.assert_close(tiled.style.losses[name].target.mean, loss.target.mean,
                                   rtol=1e-5, atol=1e-9)


def test_compute_losses_with_tile_gives_the_untiled_report(vgg16_random, images):
    candidate = Image.fromarray(np.random.default_rng(4).integers(0, 256, (100, 136, 3),
                                                                  dtype=np.uint8))
    reports = [vgg16_random.compute_losses(
        candidate, images["cat"], images["starry"], StyleOptions(
            precision="fp32", tile=tile, tv_weight=2.0, **SHALLOW), gradient=True)
        for tile in ("off", 32)]
    whole, tiled = reports
    assert tiled.losses.total == pytest.approx(whole.losses.total, rel=1e-5)
    g0, g1 = (np.frombuffer(r.gradient_bytes, "<f4") for r in reports)
    assert np.linalg.norm(g1 - g0) / np.linalg.norm(g0) < 1e-4


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_stylize_with_tiles_follows_the_untiled_run(vgg16_random, images, optimizer):
    """Two steps on 64 x 43 px in 2 x 1 tiles (shallow layers: halo 8 px). Adam's first
    steps are about lr * sign(gradient), so where a gradient is near 0 a last-bit difference
    may flip a step: a few pixels may differ by more than one level."""
    results = [vgg16_random.stylize(images["cat"], images["starry"], StyleOptions(
        size=64, iterations=2, precision="fp32", optimizer=optimizer, tolerance=0,
        tile=tile, tv_weight=1.0, content_layers=("relu2_2",),
        style_layers=("relu1_1", "relu2_1"))) for tile in ("off", 32)]
    whole, tiled = results
    assert tiled.image.size == whole.image.size == (64, 43)
    assert tiled.losses.total == pytest.approx(whole.losses.total, rel=1e-4)
    diff = np.abs(np.asarray(tiled.image, int) - np.asarray(whole.image, int))
    assert diff.mean() < 0.02 and np.quantile(diff, 0.999) <= 1, (diff.mean(), diff.max())
    start = np.asarray(Image.open(images["cat"]).convert("RGB").resize((64, 43)), int)
    assert np.abs(np.asarray(tiled.image, int) - start).mean() > 1  # it did optimise


def test_cancelled_between_tiles(vgg16_random, images):
    polls = []

    def should_stop() -> bool:
        polls.append(1)
        return len(polls) > 3

    objective_options = StyleOptions(precision="fp32", tile=16, **SHALLOW)
    candidate = Image.new("RGB", (128, 96), (120, 80, 40))
    with pytest.raises(Cancelled):
        vgg16_random.compute_losses(candidate, images["cat"], images["starry"],
                                    objective_options, gradient=True,
                                    should_stop=should_stop)
