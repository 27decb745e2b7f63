"""The engine: extractor layers and weights, losses, optimisation, determinism, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from conftest import shrink
from PIL import Image

from gramstyle import kernels
from gramstyle.engine import StyleTransfer
from gramstyle.engine.colour import keep_colours
from gramstyle.engine.extractor import VGGFeatures, WeightsError, imagenet_weights_path
from gramstyle.engine.objective import Objective
from gramstyle.engine.tensors import to_tensor
from gramstyle.images import load_image, resize_long_side
from gramstyle.options import StyleOptions


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / 255


def psnr(a: Image.Image, b: Image.Image) -> float:
    return 10 * math.log10(1 / ((pixels(a) - pixels(b)) ** 2).mean())


# ----------------------------------------------------------------- the lecture's worked examples

def test_lecture_gram_example():
    v = torch.tensor([[4.0, 0, 3, 1], [3, 0, 1, 2], [4, 5, 0, 3]])
    expected = torch.tensor([[26.0, 17, 19], [17, 14, 18], [19, 18, 50]])
    assert torch.equal(kernels.gram(v[None], scale=1.0)[0], expected)
    # Default normalisation is 1/(C*N) = 1/12.
    torch.testing.assert_close(kernels.gram(v[None])[0], expected / 12)


def test_the_image_is_the_variable(random_engine, images):
    """The lecture's point: the input image is the variable, and the engine differentiates
    the loss with respect to its pixels. With only the tv term (content and style weights 0)
    that gradient has a closed form, computed here independently: tv = mean(dy^2) +
    mean(dx^2), so each difference d = x[k+1] - x[k] adds 2 d / count(d) to x[k+1] and
    subtracts it from x[k]."""
    candidate = shrink(images["coffee"], 24)
    report = random_engine.compute_losses(
        candidate, [images["cat"]], [],
        StyleOptions(content_weight=0, style_weight=0, tv_weight=2.5, precision="fp32"),
        gradient=True)
    x = pixels(candidate).transpose(2, 0, 1)  # [3, H, W]
    dy, dx = x[:, 1:] - x[:, :-1], x[:, :, 1:] - x[:, :, :-1]
    expected = np.zeros_like(x)
    expected[:, 1:] += 2 * dy / dy.size
    expected[:, :-1] -= 2 * dy / dy.size
    expected[:, :, 1:] += 2 * dx / dx.size
    expected[:, :, :-1] -= 2 * dx / dx.size
    assert report.losses.tv == pytest.approx((dy ** 2).mean() + (dx ** 2).mean(), rel=1e-5)
    assert report.losses.total == pytest.approx(2.5 * report.losses.tv, rel=1e-6)
    np.testing.assert_allclose(report.gradient, 2.5 * expected, rtol=1e-4,
                               atol=1e-6 * np.abs(expected).max())


# ----------------------------------------------------------------- extractor

@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vgg19", "vgg16"])
def test_layer_names_match_torchvision(arch):
    reference = getattr(torchvision.models, arch)().features
    net = VGGFeatures(arch, "random")
    assert len(net.layer_names) == len(reference)
    kinds = {"conv": torch.nn.Conv2d, "relu": torch.nn.ReLU, "pool": torch.nn.MaxPool2d}
    for name, module in zip(net.layer_names, reference, strict=True):
        assert isinstance(module, kinds[name[:4]]), (name, module)
    # The lecture's nn.Sequential picture: conv 0, relu 1, conv 2, relu 3, pool 4, conv 5.
    assert net.layer_names[:6] == ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1",
                                   "conv2_1"]
    assert net.resolve("5") == "conv2_1" and net.resolve(1) == "relu1_1"
    last = "pool5"
    assert net.layer_names[-1] == last
    if arch == "vgg19":
        assert len(net.layer_names) == 37 and net.layer_names[35] == "relu5_4"
        assert net.resolve("21") == "conv4_2" and net.resolve("22") == "relu4_2"


def test_extractor_runs_only_to_deepest_layer_and_matches_torchvision():
    net = VGGFeatures("vgg19", "random", seed=3)
    reference = torchvision.models.vgg19().features
    reference.load_state_dict(net.layers.state_dict())
    x = torch.rand(1, 3, 32, 32)
    normalised = (x - net.mean) / net.std
    executed = []
    hooks = [module.register_forward_hook(lambda *_, index=i: executed.append(index))
             for i, module in enumerate(net.layers)]
    try:
        out = net(x, ["relu2_1", "conv1_1"])
    finally:
        for hook in hooks:
            hook.remove()
    # conv1_1 ... relu2_1 are modules 0 to 6 of 37: those seven ran, once each, in order.
    assert executed == list(range(7))
    assert set(out) == {"relu2_1", "conv1_1"}
    torch.testing.assert_close(out["relu2_1"], reference[:7](normalised), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["conv1_1"], reference[:1](normalised), rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in net.parameters()) and not net.training


@pytest.mark.slow
def test_random_weights_are_seeded():
    a, b, c = (VGGFeatures("vgg19", "random", seed=s) for s in (1, 1, 2))
    assert torch.equal(a.layers[0].weight, b.layers[0].weight)
    assert not torch.equal(a.layers[0].weight, c.layers[0].weight)


def test_avg_pooling():
    net = VGGFeatures("vgg16", "random", pooling="avg")
    assert isinstance(net.layers[4], torch.nn.AvgPool2d)


def test_loads_shared_vgg16(vgg16_weights):
    net = VGGFeatures("vgg16", str(vgg16_weights))
    state = torch.load(vgg16_weights, weights_only=True)
    assert torch.equal(net.layers[28].weight, state["28.weight"])


@pytest.mark.slow
def test_loads_whole_vgg_state_dict(tmp_path):
    model = torchvision.models.vgg16()
    torch.save(model.state_dict(), tmp_path / "whole.pth")
    net = VGGFeatures("vgg16", str(tmp_path / "whole.pth"))
    assert torch.equal(net.layers[0].weight, model.features[0].weight)


@pytest.mark.slow
def test_wrong_shape_weights_file(tmp_path):
    state = torchvision.models.vgg16().features.state_dict()
    state["2.weight"] = torch.zeros(64, 32, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"weights: .*'2.weight' has shape \(64, 32, 3, 3\), "
                                           r"expected \(64, 64, 3, 3\)"):
        VGGFeatures("vgg16", str(tmp_path / "bad.pth"))


@pytest.mark.slow
def test_wrong_keys_weights_file(tmp_path, vgg16_weights):
    # The VGG16 file has 13 convs; VGG19 needs 16.
    with pytest.raises(WeightsError, match=r"weights: .* does not match vgg19 .*missing keys"):
        VGGFeatures("vgg19", str(vgg16_weights))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "keys.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys \['conv.weight'\]"):
        VGGFeatures("vgg16", str(tmp_path / "keys.pth"))


@pytest.mark.slow
def test_weights_file_missing_or_not_a_state_dict(tmp_path):
    with pytest.raises(WeightsError, match=r"weights: file not found: '.*nope.pth'"):
        VGGFeatures("vgg16", str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError,
                       match=r"weights: '.*junk.pth' is not a weights file: torch cannot read it"):
        VGGFeatures("vgg16", str(tmp_path / "junk.pth"))


@pytest.mark.slow
def test_imagenet_weights_from_cache_work_offline(tmp_path, monkeypatch):
    """The real ImageNet path: torchvision's cache file is used when present."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = imagenet_weights_path("vgg16")
    assert path == tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    model = torchvision.models.vgg16()
    path.parent.mkdir(parents=True)
    torch.save(model.state_dict(), path)
    net = VGGFeatures("vgg16", "imagenet")
    assert torch.equal(net.layers[0].weight, model.features[0].weight)


def test_imagenet_unavailable_names_file_and_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as info:
        VGGFeatures("vgg19", "imagenet")
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth") in message
    assert "--weights random" in message and "--weights PATH" in message


# ----------------------------------------------------------------- optimisation

@pytest.mark.slow
def test_inversion_through_relu1_1_of_random_vgg19(random_engine, images):
    """The lecture's RandomNet experiment: noise -> relu1_1 features -> the image again."""
    target = shrink(images["cat"], 64)
    options = StyleOptions(size=64, content_layers=("relu1_1",), style_weight=0, init="noise",
                           iterations=100)
    result = random_engine.stylize([target], [], options)
    assert result.image.size == target.size
    assert psnr(result.image, target) > 30


@pytest.mark.slow
def test_deep_layers_lose_detail(random_engine, images):
    """Shallow layers reproduce the image almost exactly; deeper ones less so."""
    target = shrink(images["cat"], 64)
    quality = {}
    for layer in ("relu1_1", "relu3_1"):
        options = StyleOptions(size=64, content_layers=(layer,), style_weight=0, init="noise",
                               iterations=60)
        quality[layer] = psnr(random_engine.stylize([target], [], options).image, target)
    assert quality["relu1_1"] > quality["relu3_1"] + 5


@pytest.mark.slow
def test_losses_decrease_and_progress_reports(hed_engine, images):
    seen = []
    options = StyleOptions(size=64, iterations=20, progress_every=5)
    result = hed_engine.stylize([images["cat"]], [images["starry"]], options,
                                progress=seen.append, preview=True)
    assert [p.iteration for p in seen] == [0, 5, 10, 15, 20]
    assert all(p.image.size == result.image.size for p in seen)
    assert seen[0].losses.content == pytest.approx(0, abs=1e-6)  # init = content
    assert seen[-1].losses.total < 0.5 * seen[0].losses.total
    assert seen[-1].losses == result.losses
    assert set(result.losses.style_layers) == set(options.style_layers)
    assert result.losses.total == pytest.approx(
        options.content_weight * result.losses.content + options.style_weight
        * result.losses.style + options.tv_weight * result.losses.tv, rel=1e-5)
    assert result.image.size == (64, 43) and result.iterations == 20


@pytest.mark.slow
def test_adam_and_bf16_reduce_the_loss(random_engine, images):
    for options in (StyleOptions(size=48, iterations=15, optimizer="adam", learning_rate=0.05),
                    StyleOptions(size=48, iterations=8, precision="bf16")):
        seen = []
        random_engine.stylize([images["cat"]], [images["starry"]], options, progress=seen.append)
        assert seen[-1].losses.total < seen[0].losses.total, options


@pytest.mark.slow
def test_two_content_targets(random_engine, images):
    """One image pulled toward two targets ends nearer to each than to an unrelated image."""
    a, b = shrink(images["cat"], 64), shrink(images["coffee"], 64).resize((64, 43))
    unrelated = shrink(images["rocket"], 64).resize((64, 43))
    options = StyleOptions(size=64, content_layers=("relu2_1",), style_weight=0, init="noise",
                           iterations=60, content_blend_weights=(0.5, 0.5))
    out = random_engine.stylize([a, b], [], options).image
    d = {name: ((pixels(out) - pixels(im)) ** 2).mean()
         for name, im in (("a", a), ("b", b), ("unrelated", unrelated))}
    assert d["a"] < d["unrelated"] and d["b"] < d["unrelated"], d


def test_blended_styles_match_per_style_losses(hed_engine, images):
    """The blended style loss equals the weighted sum of the per-style losses."""
    cat, starry, scream = images["cat"], images["starry"], images["scream"]
    single = {s: hed_engine.compute_losses(shrink(cat, 64), [cat], [s], StyleOptions(size=64))
              .losses.style for s in (starry, scream)}
    blend = hed_engine.compute_losses(
        shrink(cat, 64), [cat], [starry, scream],
        StyleOptions(size=64, style_blend_weights=(0.25, 0.75))).losses.style
    assert blend == pytest.approx(0.25 * single[starry] + 0.75 * single[scream], rel=1e-4)


@pytest.mark.slow
def test_several_styles_optimise_toward_the_blend(hed_engine, images):
    options = StyleOptions(size=48, iterations=15, style_blend_weights=(1, 1))
    styles = [images["starry"], images["scream"]]
    result = hed_engine.stylize([images["cat"]], styles, options)
    before = hed_engine.compute_losses(shrink(images["cat"], 48), [images["cat"]], styles,
                                       options).losses.style
    assert result.losses.style < 0.7 * before


@pytest.mark.slow
def test_coarse_to_fine_scales(random_engine, images):
    seen = []
    options = StyleOptions(size=90, iterations=6, scales=3, progress_every=6)
    result = random_engine.stylize([images["cat"]], [images["starry"]], options,
                                   progress=seen.append, preview=True)
    # Long sides 90/2 = 45, 90/sqrt(2) = 64, 90; iterations count across the scales.
    assert [(p.iteration, p.iterations, p.image.width) for p in seen] == [
        (0, 18, 45), (6, 18, 64), (12, 18, 90), (18, 18, 90)]
    assert result.iterations == 18 and result.image.size == (90, 60)
    assert seen[-1].losses.total < seen[0].losses.total


@pytest.mark.slow
def test_texture_synthesis_without_content(random_engine, images):
    options = StyleOptions(size=48, content_weight=0, init="noise", iterations=10)
    result = random_engine.stylize([], [images["starry"]], options)
    assert result.image.size == (48, 30)  # the style image's aspect ratio
    assert result.losses.content == 0


@pytest.mark.slow
def test_seed_determinism(random_engine, images):
    options = StyleOptions(size=48, iterations=5, init="noise", seed=7)
    run = lambda o: pixels(random_engine.stylize([images["cat"]], [images["starry"]], o).image)  # noqa: E731
    first, second = run(options), run(options)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, run(StyleOptions(size=48, iterations=5, init="noise",
                                                      seed=8)))


def test_init_style_and_image(random_engine, images):
    """init 'style' starts from the style image as the network sees it (long side
    size * style_scale), stretched to the output size; init 'image' from the init image
    resized to the output size. The first progress image is that start."""
    style_as_used = resize_long_side(load_image(images["starry"]), 40)
    content = pixels(shrink(images["cat"], 40))
    for init, start, extra in (("style", style_as_used, {}),
                               ("image", load_image(images["coffee"]),
                                {"init_image": images["coffee"]})):
        seen = []
        result = random_engine.stylize([images["cat"]], [images["starry"]],
                                       StyleOptions(size=40, iterations=2, init=init),
                                       progress=seen.append, preview=True, **extra)
        assert result.image.size == (40, 27)
        first = pixels(seen[0].image)
        expected = pixels(start.resize((40, 27), Image.Resampling.LANCZOS))
        assert seen[0].iteration == 0 and first.shape == expected.shape
        assert np.abs(first - expected).mean() < 0.01, init  # 8-bit rounding apart
        assert np.abs(first - content).mean() > 0.1, init  # and not the content image


# NTSC RGB -> YIQ, as docs/options.md names it: Y luminance, I and Q chroma.
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def yiq(image: Image.Image) -> np.ndarray:
    return pixels(image) @ RGB_TO_YIQ.T


def test_preserve_colors_keeps_content_chroma(random_engine, images):
    """With preserve_colors the output has the content's chroma (I, Q) and the luminance (Y)
    of the same run without it. init 'style' makes the stylised colours far from the
    content's, so keeping them (or doing nothing) would fail."""
    common = dict(size=48, iterations=5, init="style")
    plain = random_engine.stylize([images["cat"]], [images["starry"]],
                                  StyleOptions(**common)).image
    kept = random_engine.stylize([images["cat"]], [images["starry"]],
                                 StyleOptions(**common, preserve_colors=True)).image
    content = shrink(images["cat"], 48)
    assert kept.size == plain.size == content.size
    # Apart from 8-bit rounding and the few pixels the recombination clips to [0, 1].
    assert np.abs(yiq(kept)[..., 1:] - yiq(content)[..., 1:]).mean() < 0.005
    assert np.abs(yiq(kept)[..., 0] - yiq(plain)[..., 0]).mean() < 0.005
    assert np.abs(yiq(plain)[..., 1:] - yiq(content)[..., 1:]).mean() > 0.05
    # Re-applying colour preservation changes nothing: the chroma already is the content's.
    out, ref = to_tensor(kept, "cpu"), to_tensor(content, "cpu")
    torch.testing.assert_close(keep_colours(out, ref), out, atol=0.02, rtol=0)


def test_style_scale_changes_style_target(random_engine, images):
    def style_loss(scale):
        return random_engine.compute_losses(
            shrink(images["cat"], 64), [images["cat"]], [images["starry"]],
            StyleOptions(style_scale=scale)).losses.style
    assert style_loss(0.5) != pytest.approx(style_loss(2.0), rel=1e-3)


def test_style_scale_sets_the_style_size_the_network_sees(random_engine, images):
    """The style image reaches the network at long side max(candidate) * style_scale, and the
    Gram target comes from that resized image."""
    candidate = shrink(images["cat"], 64)  # 64x43
    # A style image made here (120x90), so no target computed by another test is reused.
    style = Image.fromarray(np.random.default_rng(5).integers(0, 256, (90, 120, 3),
                                                               dtype=np.uint8))
    seen: list[tuple[int, int]] = []
    hook = random_engine.extractor.register_forward_pre_hook(
        lambda _module, args: seen.append(tuple(args[0].shape[-2:])))
    losses = {}
    try:
        for scale, expected in ((0.5, (24, 32)), (2.0, (96, 128))):  # (H, W) of the style
            seen.clear()
            losses[scale] = random_engine.compute_losses(
                candidate, [images["cat"]], [style],
                StyleOptions(style_scale=scale, precision="fp32")).losses.style
            assert expected in seen, (scale, seen)
            assert set(seen) <= {expected, (43, 64)}, seen  # the style, content, candidate
    finally:
        hook.remove()
    # Provenance: a style image given already at long side 32 gives the same target at scale
    # 0.5 (any other size would resize it twice and change the Gram).
    same = random_engine.compute_losses(
        candidate, [images["cat"]], [resize_long_side(style, 32)],
        StyleOptions(style_scale=0.5, precision="fp32")).losses.style
    assert same == pytest.approx(losses[0.5], rel=1e-6)
    assert losses[0.5] != pytest.approx(losses[2.0], rel=1e-3)


def test_compute_losses_gradient_matches_finite_difference(random_engine, images):
    candidate = shrink(images["coffee"], 32)
    options = StyleOptions(content_layers=("relu2_1",), style_layers=("relu1_1", "relu2_1"))
    report = random_engine.compute_losses(candidate, [images["cat"]], [images["starry"]],
                                          options, gradient=True)
    assert report.gradient.shape == (3, candidate.height, candidate.width)
    assert report.gradient.dtype == np.float32 and np.abs(report.gradient).max() > 0
    # Directional derivative along the gradient, by central differences in float32.
    # The engine's own objective, built as compute_losses builds it.
    problem = Objective.build(random_engine.extractor, [load_image(images["cat"])],
                              [load_image(images["starry"])], random_engine.validate(options),
                              size=candidate.size)
    x = to_tensor(candidate, "cpu")
    direction = torch.from_numpy(report.gradient.copy())[None]
    direction /= direction.norm()
    eps = 1e-2
    plus, _ = problem.evaluate(x + eps * direction)
    minus, _ = problem.evaluate(x - eps * direction)
    numeric = (plus - minus).item() / (2 * eps)
    analytic = float(np.sum(report.gradient * direction[0].numpy()))
    assert numeric == pytest.approx(analytic, rel=0.05)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_relative_losses_match_their_formulas(random_engine, images):
    """content, style and tv as docs/options.md writes them, computed here in float64 on a
    tiny network (the engine's random VGG19 up to relu2_1, rebuilt from torchvision), with
    two content and two style images, layer weights and blend weights:

        content = sum_l w_l sum_i b_i ||F_l(x) - F_l(c_i)||^2 / ||F_l(c_i)||^2
        style   = sum_l w_l sum_j b_j ||G_l(x) - G_l(s_j)||^2 / ||G_l(s_j)||^2,
                  G_l = F_l F_l^T / (C_l N_l)
        tv      = mean(dy^2) + mean(dx^2)
        total   = content_weight * content + style_weight * style + tv_weight * tv
    """
    net = torchvision.models.vgg19().features[:7].double()  # conv1_1 ... relu2_1
    net.load_state_dict({k: v for k, v in random_engine.extractor.layers.state_dict().items()
                         if int(k.split(".")[0]) < 7})
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)

    def features(image: Image.Image) -> dict[str, torch.Tensor]:
        x = torch.from_numpy(pixels(image)).permute(2, 0, 1)[None]
        out, x = {}, (x - mean) / std
        for i, module in enumerate(net):
            x = torch.relu(x) if isinstance(module, torch.nn.ReLU) else module(x)
            if i in (1, 6):
                out["relu1_1" if i == 1 else "relu2_1"] = x[0].flatten(1)  # [C, N]
        return out

    def gram(f: torch.Tensor) -> torch.Tensor:
        return f @ f.T / f.numel()

    # Inputs already at the sizes the engine uses (contents at the candidate's size, styles
    # at its long side), so no resampling stands between the engine and this test.
    candidate = shrink(images["rocket"], 32).resize((32, 24))
    contents = [shrink(images["cat"], 32).resize((32, 24)), shrink(images["coffee"], 32).resize(
        (32, 24))]
    styles = [shrink(images["starry"], 32), shrink(images["scream"], 32)]
    layers, layer_w = ("relu1_1", "relu2_1"), {"content": (1.0, 3.0), "style": (2.0, 1.0)}
    blend = {"content": (1.0, 2.0), "style": (3.0, 1.0)}
    options = StyleOptions(content_layers=layers, content_layer_weights=layer_w["content"],
                           style_layers=layers, style_layer_weights=layer_w["style"],
                           content_blend_weights=blend["content"],
                           style_blend_weights=blend["style"], content_weight=1.5,
                           style_weight=4.0, tv_weight=0.7, precision="fp32")
    report = random_engine.compute_losses(candidate, contents, styles, options)

    fx = features(candidate)
    per_layer = {"content": {}, "style": {}}
    for kind, targets, transform in (("content", contents, lambda f: f),
                                     ("style", styles, gram)):
        feats = [features(t) for t in targets]
        weights = np.array(blend[kind]) / sum(blend[kind])
        for name in layers:
            x = transform(fx[name])
            per_layer[kind][name] = sum(
                b * ((x - transform(f[name])) ** 2).sum().item()
                / (transform(f[name]) ** 2).sum().item() for b, f in zip(weights, feats,
                                                                         strict=True))
    terms = {kind: sum(w / sum(layer_w[kind]) * per_layer[kind][name]
                       for w, name in zip(layer_w[kind], layers, strict=True))
             for kind in ("content", "style")}
    x = pixels(candidate)
    tv = ((x[1:] - x[:-1]) ** 2).mean() + ((x[:, 1:] - x[:, :-1]) ** 2).mean()
    losses = report.losses
    for name in layers:
        assert losses.content_layers[name] == pytest.approx(per_layer["content"][name], rel=1e-4)
        assert losses.style_layers[name] == pytest.approx(per_layer["style"][name], rel=1e-4)
    assert losses.content == pytest.approx(terms["content"], rel=1e-4)
    assert losses.style == pytest.approx(terms["style"], rel=1e-4)
    assert losses.tv == pytest.approx(tv, rel=1e-5)
    assert losses.total == pytest.approx(1.5 * terms["content"] + 4.0 * terms["style"]
                                         + 0.7 * tv, rel=1e-4)


def test_each_scale_starts_from_the_previous_result_upsampled(random_engine, images):
    """Coarse-to-fine: the second scale's start image (its first progress image) is the
    first scale's result, upsampled (bicubic), not a fresh start. scale_sizes(64, 2) =
    [45, 64], so the first scale is exactly a one-scale run at size 45."""
    common = dict(iterations=4, init="noise", seed=3, precision="fp32")
    coarse = random_engine.stylize([images["cat"]], [images["starry"]],
                                   StyleOptions(size=45, **common)).image
    seen = []
    random_engine.stylize([images["cat"]], [images["starry"]],
                          StyleOptions(size=64, scales=2, progress_every=4, **common),
                          progress=seen.append, preview=True)
    assert [(p.iteration, p.image.size) for p in seen] == [
        (0, (45, 30)), (4, (64, 43)), (8, (64, 43))]

    def upsampled(image: Image.Image) -> np.ndarray:
        x = torch.from_numpy(pixels(image)).permute(2, 0, 1)[None]
        x = torch.nn.functional.interpolate(x, size=(43, 64), mode="bicubic",
                                            align_corners=False).clamp(0, 1)
        return x[0].permute(1, 2, 0).numpy()

    start = pixels(seen[1].image)
    # Within 8-bit rounding (the engine upsamples the unrounded pixels) ...
    assert np.abs(start - upsampled(coarse)).max() < 3 / 255
    # ... and far from a restart: the first scale's noise start, or the content image.
    assert np.abs(start - upsampled(seen[0].image)).mean() > 0.02
    assert np.abs(start - pixels(shrink(images["cat"], 64))).mean() > 0.1


BACKEND_SCRIPT = """
import json, sys
from gramstyle.images import load_image, resize_long_side
from gramstyle.options import StyleOptions
from gramstyle.engine import StyleTransfer
candidate, content, style = sys.argv[1:4]
engine = StyleTransfer(arch="vgg19", weights="random", device="cpu")
# fp32: the default precision, auto, may pick bf16, whose rounding would swamp the comparison.
report = engine.compute_losses(resize_long_side(load_image(candidate), 64), [content], [style],
                               StyleOptions(precision="fp32"), gradient=True)
result = engine.stylize([content], [style], StyleOptions(size=48, iterations=5,
                                                         precision="fp32"))
print(json.dumps([engine.backend, report.losses.style_layers, report.losses.content,
                  float(abs(report.gradient).sum()), list(result.image.tobytes()),
                  result.losses.total]))
"""


@pytest.mark.slow
def test_losses_agree_across_kernel_backends(images):
    """The engine gives the same losses, gradient and result whether the fused op or einsum
    runs."""
    results = {}
    for kernel in ("default", "einsum"):
        env = dict(os.environ, GRAMSTYLE_KERNEL=kernel) if kernel == "einsum" else None
        out = subprocess.run(
            [sys.executable, "-c", BACKEND_SCRIPT, str(images["coffee"]), str(images["cat"]),
             str(images["starry"])], env=env, capture_output=True, text=True, check=True)
        results[kernel] = json.loads(out.stdout.strip().splitlines()[-1])
    assert results["einsum"][0] == "einsum"
    assert results["default"][0] == kernels.backend()
    for layer, value in results["einsum"][1].items():
        assert results["default"][1][layer] == pytest.approx(value, rel=1e-4), layer
    assert results["default"][2] == pytest.approx(results["einsum"][2], rel=1e-6)
    assert results["default"][3] == pytest.approx(results["einsum"][3], rel=1e-3)
    # A short optimisation ends in (nearly) the same image and loss.
    fused, einsum = (np.array(results[k][4], dtype=np.float64) for k in ("default", "einsum"))
    assert np.abs(fused - einsum).mean() < 1.0  # in 0..255 grey levels
    assert results["default"][5] == pytest.approx(results["einsum"][5], rel=1e-2)


# ----------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, message", [
    ({"iterations": 0}, r"iterations: must be between 1 and \d+, got 0"),
    ({"iterations": -3}, r"iterations: .* got -3"),
    ({"size": 100000}, r"size: must be an integer between 16 and 4096 pixels, got 100000"),
    ({"style_weight": -1.0}, r"style_weight: must be a finite number >= 0, got -1.0"),
    ({"content_weight": float("nan")}, r"content_weight: .* got nan"),
    ({"tolerance": -0.1}, r"tolerance: must be a finite number >= 0, got -0.1"),
    ({"tolerance": float("inf")}, r"tolerance: must be a finite number >= 0, got inf"),
    ({"style_layer_weights": (1, 1, float("nan"), 1, 1)},
     r"style_layer_weights\[2\]: must be a finite number >= 0, got nan"),
    ({"style_layers": ("relu1_1", "relu9_9")}, r"style_layers: unknown layer 'relu9_9'"),
    ({"content_layers": ("99",)}, r"content_layers: unknown layer '99'"),
    ({"optimizer": "sgd"}, r"optimizer: must be one of lbfgs, adam, got 'sgd'"),
    ({"scales": 9}, r"scales: must be an integer between 0 and 8, got 9"),
    ({"size": 64, "scales": 4}, r"scales: 4 scales from size 64 would start below 32 px"),
    ({"iterations": 5000, "scales": 3}, r"iterations: iterations\*scales must be at most"),
    ({"style_blend_weights": (1.0, 2.0)}, r"style_blend_weights: expected 1 value"),
    ({"style_blend_weights": (-1.0,)}, r"style_blend_weights\[0\]: .* got -1.0"),
])
def test_bad_options(random_engine, images, kwargs, message):
    kwargs = dict(kwargs)  # the parametrize dict is shared: never mutate it
    with pytest.raises(ValueError, match=message):
        random_engine.stylize([images["cat"]], [images["starry"]],
                              StyleOptions(iterations=kwargs.pop("iterations", 1), **kwargs))


def test_bad_images(random_engine, images, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(images["cat"].read_bytes()[:200])
    cases = [
        ([tmp_path / "missing.png"], [images["starry"]], r"content\[0\]: file not found"),
        ([images["cat"]], [b"not an image"], r"style\[0\]: cannot decode image"),
        ([images["cat"]], [b""], r"style\[0\]: empty image"),
        ([corrupt], [images["starry"]], r"content\[0\]: corrupt or truncated image"),
        ([images["cat"]], [Image.new("RGB", (0, 5))], r"style\[0\]: zero-size image \(0x5\)"),
        ([images["cat"], tmp_path], [images["starry"]], r"content\[1\]: is a directory"),
    ]
    for content, style, message in cases:
        with pytest.raises(ValueError, match=message):
            random_engine.stylize(content, style, StyleOptions(iterations=1))


def test_image_over_pixel_limit_rejected_before_decoding(images):
    engine = StyleTransfer(arch="vgg16", weights="random", device="cpu", max_pixels=100 * 100)
    with pytest.raises(ValueError, match=r"content\[0\]: image is 451x300 = 135300 pixels, "
                                         r"over the limit of 10000 pixels"):
        engine.stylize([images["cat"]], [images["starry"]], StyleOptions(iterations=1))


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 48, "content": "wide"},
     r"size: the image would be 48x12 px, too small for layer relu5_1 \(its short side must "
     r"be at least 16 px\)"),
    ({"size": 32, "style_layers": ("pool5",)}, r"size: .*too small for layer pool5 .*32 px"),
    ({"size": 64, "style_scale": 0.2},
     r"style\[0\]: resized to 16x10 px \(long side size\*style_scale = 16\), too small for "
     r"layer relu5_1"),
    ({"content_layers": ("relu4_2", "22")},
     r"content_layers: layer relu4_2 is listed twice \('relu4_2' and '22'\)"),
    ({"style_layers": "relu1_1,relu1_1"}, r"style_layers: layer relu1_1 is listed twice"),
    ({"seed": 2**64}, r"seed: must be a 64-bit integer, got 18446744073709551616"),
    ({"content_layers": None}, r"content_layers: expected a list of layer names, got None"),
    ({"style_layers": ("²",)}, r"style_layers: unknown layer '²'"),
    ({"progress_every": True}, r"progress_every: must be an integer >= 1, got True"),
])
def test_more_bad_options(random_engine, images, kwargs, message):
    kwargs = dict(kwargs)  # the parametrize dict is shared: never mutate it
    content = {"wide": shrink(images["cat"], 64).resize((48, 12))}.get(kwargs.pop("content", None),
                                                                  images["cat"])
    with pytest.raises(ValueError, match=message):
        random_engine.stylize([content], [images["starry"]], StyleOptions(iterations=1, **kwargs))


def test_small_sizes_work_with_shallow_layers(random_engine, images):
    options = StyleOptions(size=16, iterations=1, content_layers=("relu2_1",),
                           style_layers=("relu1_1",))
    assert random_engine.stylize([images["cat"]], [images["starry"]], options).image.size == (
        16, 11)


def test_candidate_too_small_for_deep_layers(random_engine, images):
    with pytest.raises(ValueError, match=r"candidate: the image would be 8x8 px, too small for "
                                         r"layer relu5_1"):
        random_engine.compute_losses(Image.new("RGB", (8, 8)), [images["cat"]],
                                     [images["starry"]])


def test_compute_losses_checks_style_scale_against_the_candidate(random_engine, images):
    # 64 px candidate * 10 = 640 px style: fine, although 512 (the default size) * 10 is not.
    report = random_engine.compute_losses(shrink(images["cat"], 64), [images["cat"]],
                                          [images["starry"]], StyleOptions(style_scale=10))
    assert report.losses.style > 0
    with pytest.raises(ValueError, match=r"style_scale: .* got 80"):
        random_engine.compute_losses(shrink(images["cat"], 64), [images["cat"]],
                                     [images["starry"]], StyleOptions(style_scale=80))


def test_init_defaults_and_init_image(random_engine, images):
    def start(options, **kwargs):
        seen = []
        random_engine.stylize([images["cat"]], [images["starry"]], options, preview=True,
                              progress=seen.append, **kwargs)
        return pixels(seen[0].image)

    coffee = pixels(shrink(images["coffee"], 32).resize((32, 21)))
    cat = pixels(shrink(images["cat"], 32))
    # Unset init: the init image when one is given, else the content image.
    assert np.abs(start(StyleOptions(size=32, iterations=1), init_image=images["coffee"])
                  - coffee).mean() < 0.02
    assert np.abs(start(StyleOptions(size=32, iterations=1)) - cat).mean() < 0.02
    with pytest.raises(ValueError, match=r"init_image: given, but init is 'noise'"):
        random_engine.stylize([images["cat"]], [images["starry"]],
                              StyleOptions(iterations=1, init="noise"),
                              init_image=images["coffee"])


def test_bytes_like_sources(random_engine, images):
    data = images["cat"].read_bytes()
    for source in (data, bytearray(data), memoryview(data)):
        result = random_engine.stylize(source, None, StyleOptions(size=32, iterations=1,
                                                                  style_weight=0))
        assert result.image.size == (32, 21)


def test_missing_images_for_nonzero_weights(random_engine, images):
    with pytest.raises(ValueError, match=r"style: at least one style image is needed"):
        random_engine.stylize([images["cat"]], [], StyleOptions(iterations=1))
    with pytest.raises(ValueError, match=r"content: at least one content image is needed"):
        random_engine.stylize([], [images["starry"]], StyleOptions(iterations=1))


def test_divergence_is_a_clear_error(random_engine, images):
    """Loss weights near float32's limit overflow the total to inf, and the gradient to nan:
    the run stops with an error naming learning_rate (and the weights), not a nan image."""
    huge = 1e38
    with pytest.raises(ValueError, match=r"^learning_rate: the optimisation diverged \(total "
                                         r"loss (nan|inf|-inf) at iteration \d+\); lower "
                                         r"learning_rate or the loss weights"):
        random_engine.stylize([images["cat"]], [images["starry"]], StyleOptions(
            size=32, iterations=10, content_weight=huge, style_weight=huge, tv_weight=huge,
            precision="fp32"))


def test_candidate_over_max_size(random_engine, images, monkeypatch):
    monkeypatch.setattr(random_engine, "max_size", 64)
    assert random_engine.compute_losses(shrink(images["cat"], 64), [images["cat"]],
                                        [images["starry"]]).width == 64
    with pytest.raises(ValueError, match=r"^candidate: long side 65 px is over the limit of "
                                         r"64 px"):
        random_engine.compute_losses(shrink(images["cat"], 65), [images["cat"]],
                                     [images["starry"]])
