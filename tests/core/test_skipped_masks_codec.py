"""A style without a mask on the wire: an empty ``bytes`` entry in the repeated
``style_mask`` / ``style_source_mask`` fields (None in Python). It pairs with its style, but
is no image; any other input's empty entry is still an empty image."""

from __future__ import annotations

import pytest
from conftest import noise, png
from PIL import Image

from gramstyle import codec, inputs
from gramstyle.errors import FieldError

MASK = png(Image.new("L", (32, 24), 255).convert("RGB"))
PICTURE = png(noise(32, 24, 1))


def test_none_travels_as_an_empty_entry_and_comes_back_as_none():
    request = codec.stylize_request(PICTURE, [PICTURE, PICTURE, PICTURE],
                                    style_mask=[None, MASK, b""],
                                    style_source_mask=[MASK, None, None], size=32)
    assert list(request.style_mask) == [b"", MASK, b""]
    assert list(request.style_source_mask) == [MASK, b"", b""]
    codec.stylize_options(request)  # the counts pair: three entries for three styles
    images = codec.engine_images(request)
    assert images["style_mask"] == [None, MASK, None]
    assert images["style_source_mask"] == [MASK, None, None]
    # request_images keeps the empty entries: the service pairs, counts and probes from it.
    assert codec.request_images(request)["style_mask"] == [b"", MASK, b""]


def test_compute_losses_request_takes_skipped_masks_too():
    request = codec.losses_request(PICTURE, [PICTURE], [PICTURE, PICTURE],
                                   style_mask=[MASK, None])
    assert list(request.style_mask) == [MASK, b""]
    codec.losses_options(request, 32)
    assert codec.engine_images(request)["style_mask"] == [MASK, None]


def test_without_skipped_entries_the_lists_are_as_before():
    request = codec.stylize_request(PICTURE, [PICTURE], style_mask=[MASK], size=32)
    assert codec.engine_images(request)["style_mask"] == [MASK]
    assert codec.engine_images(request)["style_source_mask"] == []


@pytest.mark.parametrize("masks", [[None], [None, MASK, None]])
def test_the_count_still_has_to_match_the_styles(masks):
    message = (f"style_mask: expected 2 image(s), one per style image, got {len(masks)}; an "
               "empty entry stands for a style image without one")
    with pytest.raises(FieldError) as info:
        codec.stylize_request(PICTURE, [PICTURE, PICTURE], style_mask=masks)
    assert str(info.value) == message
    # The same request built by hand is refused where the server reads it.
    request = codec.stylize_request(PICTURE, [PICTURE, PICTURE], size=32)
    request.style_mask.extend([b"" if m is None else m for m in masks])
    with pytest.raises(FieldError) as info:
        codec.stylize_options(request)
    assert str(info.value) == message


def test_only_the_masks_skip_an_empty_entry():
    assert [entry.name for entry in inputs.INPUTS if entry.skippable] == [
        "style_mask", "style_source_mask"]
    mask, style = inputs.input_named("style_mask"), inputs.input_named("style")
    assert inputs.skipped(mask, b"") and inputs.skipped(mask, None)
    assert not inputs.skipped(mask, MASK)
    assert not inputs.skipped(style, b"") and not inputs.skipped(style, None)
    # An empty style entry stays an image, refused as empty where it is decoded.
    request = codec.stylize_request(PICTURE, [b""], size=32)
    assert codec.engine_images(request)["style"] == [b""]
    with pytest.raises(FieldError, match=r"^style\[0\]: expected a path"):
        codec.stylize_request(PICTURE, [None])
