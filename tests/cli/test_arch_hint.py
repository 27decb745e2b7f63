"""A weights file of the other VGG: the error says which --arch it needs."""

from __future__ import annotations

import pytest
import torch
import torchvision

from gramstyle.cli import EXIT_USAGE, main
from gramstyle.engine.extractor import VGGFeatures, WeightsError


def test_vgg16_file_without_arch_vgg16_says_add_it(vgg16_weights, images, tmp_path, capsys):
    code = main(["stylize", "--weights", str(vgg16_weights), "--content", str(images["cat"]),
                 "--style-weight", "0", "--size", "32", "--iterations", "1", "-q",
                 "-o", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert err.startswith(f"gramstyle: error: --weights: '{vgg16_weights}' does not match "
                          "vgg19 VGG features: missing keys ['16.weight'")
    assert err.rstrip().endswith("; this looks like a VGG16 state dict: add --arch vgg16")


def test_vgg19_file_with_arch_vgg16_says_use_vgg19(tmp_path):
    with torch.device("meta"):
        shapes = torchvision.models.vgg19(weights=None).features.state_dict()
    path = tmp_path / "vgg19_features.pth"
    torch.save({k: torch.zeros(v.shape) for k, v in shapes.items()}, path)
    with pytest.raises(WeightsError) as caught:
        VGGFeatures(arch="vgg16", weights=str(path))
    assert str(caught.value).endswith(
        "; this looks like a VGG19 state dict: use --arch vgg19 (the default)")


def test_other_state_dicts_get_no_arch_hint(tmp_path):
    """Keys of neither VGG (here: VGG16's with one layer missing) get the key lists only."""
    with torch.device("meta"):
        shapes = torchvision.models.vgg16(weights=None).features.state_dict()
    path = tmp_path / "partial.pth"
    torch.save({k: torch.zeros(v.shape) for k, v in shapes.items() if not k.startswith("28.")},
               path)
    for arch in ("vgg16", "vgg19"):
        with pytest.raises(WeightsError, match="does not match") as caught:
            VGGFeatures(arch=arch, weights=str(path))
        assert "looks like" not in str(caught.value)


class Opaque:
    """Not a tensor: torch.load(weights_only=True) refuses to unpickle it."""


@pytest.mark.parametrize("kind", ["text", "png", "pickled object", "truncated"])
def test_a_file_that_is_not_a_checkpoint_is_named_without_unsafe_advice(kind, tmp_path,
                                                                         images, vgg16_weights,
                                                                         capsys):
    path = tmp_path / "weights.pth"
    if kind == "text":
        path.write_text("hello world\n")
    elif kind == "png":
        path.write_bytes(images["cat"].read_bytes())
    elif kind == "pickled object":
        torch.save({"0.weight": Opaque()}, path)
    else:
        path.write_bytes(vgg16_weights.read_bytes()[:100_000])
    code = main(["stylize", "--arch", "vgg16", "--weights", str(path), "--content",
                 str(images["cat"]), "--style-weight", "0", "-q", "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert err.startswith(f"gramstyle: error: --weights: '{path}' is not a weights file: torch "
                          "cannot read it as a state_dict of tensors written by torch.save (")
    assert err.rstrip().endswith("); give a VGG state_dict file, or imagenet or random")
    assert "weights_only" not in err and "file an issue" not in err.lower()
    if kind == "truncated":
        assert "(RuntimeError: PytorchStreamReader failed reading zip archive" in err
