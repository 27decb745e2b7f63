"""Shared fixtures: the shared test images and weights, and engines loaded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    candidates = [os.environ.get("GRAMSTYLE_SHARED"), REPO.parent / "shared", "/work/shared"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "images").is_dir():
            return Path(candidate)
    raise RuntimeError(f"shared test data not found in {candidates}; set GRAMSTYLE_SHARED")


SHARED = _shared_dir()
CONTENT = SHARED / "images" / "content"
STYLE = SHARED / "images" / "style"
VGG16_WEIGHTS = SHARED / "models" / "vgg16-hed-bsds500.pth"


@pytest.fixture(scope="session")
def images() -> dict[str, Path]:
    return {
        "cat": CONTENT / "chelsea.png",
        "coffee": CONTENT / "coffee.png",
        "astronaut": CONTENT / "astronaut.png",
        "rocket": CONTENT / "rocket.jpg",
        "starry": STYLE / "starry_night.jpg",
        "scream": STYLE / "the_scream.jpg",
        "shipwreck": STYLE / "shipwreck.jpg",
    }


@pytest.fixture(scope="session")
def vgg16_weights() -> Path:
    assert VGG16_WEIGHTS.is_file(), f"missing {VGG16_WEIGHTS}"
    return VGG16_WEIGHTS


@pytest.fixture(scope="session")
def random_engine():
    """VGG19 with seeded random weights, on the CPU."""
    from gramstyle.server import StyleTransfer

    return StyleTransfer(arch="vgg19", weights="random", device="cpu")


@pytest.fixture(scope="session")
def hed_engine(vgg16_weights):
    """The shared, really trained VGG16 (HED backbone), on the CPU."""
    from gramstyle.server import StyleTransfer

    return StyleTransfer(arch="vgg16", weights=str(vgg16_weights), device="cpu")
