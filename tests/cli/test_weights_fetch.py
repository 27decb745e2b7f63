"""``gramstyle weights fetch``, offline: torchvision's URL is pointed at a local file:// copy,
so the real download (torch.hub), hash check, strict load and cache path all run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision

from gramstyle.cli import EXIT_FAILURE, EXIT_OK, main
from gramstyle.engine.extractor import VGGFeatures, WeightsError

WEIGHTS = {"vgg16": torchvision.models.VGG16_Weights.IMAGENET1K_V1,
           "vgg19": torchvision.models.VGG19_Weights.IMAGENET1K_V1}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torchvision cache: TORCH_HOME in a temporary folder."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def fake_release(tmp_path: Path, monkeypatch, arch: str, *, misnamed: bool = False
                 ) -> tuple[Path, dict]:
    """A whole-VGG state dict of seeded random weights, published at a file:// URL named as
    torchvision names its files (``vgg16-<first 8 hex digits of the SHA-256>.pth``), and set
    as torchvision's URL of the ImageNet weights of ``arch``."""
    with torch.device("meta"):
        shapes = getattr(torchvision.models, arch)(weights=None).features.state_dict()
    generator = torch.Generator().manual_seed(3)
    state = {f"features.{k}": torch.randn(v.shape, generator=generator) * 0.01
             for k, v in shapes.items()}
    folder = tmp_path / "release"
    folder.mkdir()
    staged = folder / "staged.pth"
    torch.save(state, staged)
    digest = "0badc0de" if misnamed else sha256(staged)[:8]
    published = staged.rename(folder / f"{arch}-{digest}.pth")
    monkeypatch.setattr(WEIGHTS[arch].value, "url", published.as_uri())
    return published, state


def test_fetch_downloads_checks_and_prints_path_and_sha256(tmp_path, monkeypatch, capsys,
                                                            torch_home):
    published, state = fake_release(tmp_path, monkeypatch, "vgg16")
    assert main(["weights", "fetch", "--arch", "vgg16", "-q"]) == EXIT_OK
    out = capsys.readouterr().out
    cached = torch_home / "hub" / "checkpoints" / published.name
    assert cached.read_bytes() == published.read_bytes()
    assert "vgg16 weights: downloaded" in out
    assert f"path    {cached}\n" in out
    assert f"sha256  {sha256(published)}\n" in out

    # --weights imagenet now loads exactly that file, offline.
    loaded = VGGFeatures(arch="vgg16", weights="imagenet").layers.state_dict()
    assert torch.equal(loaded["28.weight"], state["features.28.weight"])

    # A second fetch finds the good copy and downloads nothing.
    published.unlink()
    assert main(["weights", "fetch", "--arch", "vgg16", "-q"]) == EXIT_OK
    assert "vgg16 weights: already in the cache" in capsys.readouterr().out


def test_fetch_replaces_a_corrupt_cached_copy(tmp_path, monkeypatch, capsys, torch_home):
    published, _ = fake_release(tmp_path, monkeypatch, "vgg16")
    cached = torch_home / "hub" / "checkpoints" / published.name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(published.read_bytes()[:1000])  # a truncated earlier download
    assert main(["weights", "fetch", "--arch", "vgg16", "-q"]) == EXIT_OK
    assert "downloaded" in capsys.readouterr().out
    assert sha256(cached) == sha256(published)


def test_fetch_refuses_a_download_whose_hash_does_not_match(tmp_path, monkeypatch, capsys,
                                                            torch_home):
    published, _ = fake_release(tmp_path, monkeypatch, "vgg16", misnamed=True)
    assert main(["weights", "fetch", "--arch", "vgg16", "-q"]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert err.startswith("gramstyle: error: weights fetch: cannot download the ImageNet "
                          f"vgg16 weights from {published.as_uri()} (RuntimeError: invalid "
                          "hash value")
    assert not any((torch_home / "hub" / "checkpoints").glob("*")), "nothing half-written"


def test_fetch_without_internet_says_so(tmp_path, monkeypatch, capsys, torch_home):
    missing = tmp_path / "nowhere" / "vgg19-dcbb9e9d.pth"
    monkeypatch.setattr(WEIGHTS["vgg19"].value, "url", missing.as_uri())
    assert main(["weights", "fetch", "-q"]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert f"cannot download the ImageNet vgg19 weights from {missing.as_uri()} (URLError" in err
    assert "this needs internet access" in err


def test_fetch_refuses_a_file_that_is_not_a_vgg_state_dict(tmp_path, monkeypatch, torch_home):
    """A download whose hash is right but whose keys are not VGG's features fails the strict
    load (a wrong URL, say)."""
    from gramstyle.engine.imagenet_weights import fetch_imagenet_weights

    folder = tmp_path / "release"
    folder.mkdir()
    staged = folder / "staged.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, staged)
    published = staged.rename(folder / f"vgg16-{sha256(staged)[:8]}.pth")
    monkeypatch.setattr(WEIGHTS["vgg16"].value, "url", published.as_uri())
    with pytest.raises(WeightsError, match=r"does not match vgg16 VGG features: missing keys "
                                           r"\['0.weight'"):
        fetch_imagenet_weights("vgg16", progress=False)


def test_offline_imagenet_error_names_the_fetch_command(tmp_path, monkeypatch, capsys,
                                                         torch_home, images):
    missing = tmp_path / "nowhere" / "vgg19-dcbb9e9d.pth"
    monkeypatch.setattr(WEIGHTS["vgg19"].value, "url", missing.as_uri())
    code = main(["stylize", "--content", str(images["cat"]), "--style-weight", "0",
                 "-o", str(tmp_path / "out.png"), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("gramstyle: error: --weights: cannot load ImageNet weights for vgg19 "
                          "(URLError")
    assert "Fetch it on a machine with internet with `gramstyle weights fetch --arch vgg19` " \
           "(it prints the path and the SHA-256) and copy it there" in err
    assert not (tmp_path / "out.png").exists()
