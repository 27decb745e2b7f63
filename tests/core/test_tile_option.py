"""The ``tile`` option (issue 19): auto (the default), off, or a side in pixels; its wire form
(unset auto, 0 off, N pixels) and its CLI flag."""

from __future__ import annotations

import argparse

import pytest
from google.protobuf import json_format

from gramstyle import codec
from gramstyle.cli.flags import add_option_flags, given_options
from gramstyle.errors import FieldError
from gramstyle.options import StyleOptions, markdown_table, tile_pixels


@pytest.mark.parametrize("tile", ["auto", "off", 16, 512, 2048])
def test_valid_tiles(tile):
    assert StyleOptions(tile=tile).validated().tile == tile


def test_the_default_is_auto():
    assert StyleOptions().tile == "auto"
    assert "| `tile` | `--tile` | auto | Stylize, ComputeLosses |" in markdown_table()


@pytest.mark.parametrize("tile", [0, 8, 15, 4097, -32, "big", "", "64", 32.0, True, None])
def test_bad_tiles_name_the_field_and_value(tile):
    with pytest.raises(FieldError) as error:
        StyleOptions(tile=tile).validated()
    assert error.value.field == "tile"
    assert str(error.value).startswith("tile: must be auto, off or an integer between 16 and "
                                       "4096 pixels, got ")
    assert str(error.value).endswith(repr(tile))


def test_the_bound_follows_max_size():
    assert StyleOptions(size=256, tile=256).validated(max_size=256).tile == 256
    with pytest.raises(FieldError, match=r"^tile: .* between 16 and 256 pixels, got 257$"):
        StyleOptions(size=256, tile=257).validated(max_size=256)


def test_tile_pixels():
    assert [tile_pixels(t) for t in ("auto", "off", 48)] == [0, 0, 48]


@pytest.mark.parametrize("tile, wire", [("auto", None), ("off", 0), (64, 64)])
def test_wire_form(tile, wire):
    """Unset (absent from JSON) is auto, 0 off, N pixels; both calls, both ways."""
    for request, decode in ((codec.stylize_request(b"c", [b"s"], tile=tile),
                             codec.stylize_options),
                            (codec.losses_request(b"x", [b"c"], [b"s"], tile=tile),
                             codec.losses_options)):
        if wire is None:
            assert not request.HasField("tile")
            assert "tile" not in json_format.MessageToDict(request)
        else:
            assert request.HasField("tile") and request.tile == wire
            assert json_format.MessageToDict(request)["tile"] == wire
        assert decode(request).tile == tile


def test_bad_wire_values_name_the_field():
    request = codec.stylize_request(b"c", [b"s"])
    request.tile = -5
    with pytest.raises(FieldError, match=r"^tile: must be auto, off or an integer .* got -5$"):
        codec.stylize_options(request)
    with pytest.raises(FieldError, match=r"^tile: must be auto, off or an integer"):
        codec.losses_request(b"x", [b"c"], [b"s"], tile="huge")


@pytest.mark.parametrize("text, value", [("auto", "auto"), ("off", "off"), ("OFF", "off"),
                                         ("128", 128)])
def test_cli_flag(text, value):
    parser = argparse.ArgumentParser()
    add_option_flags(parser, "losses")
    assert given_options(parser.parse_args(["x.png", "--tile", text]), "losses")["tile"] == value


def test_cli_flag_refuses_other_text(capsys):
    parser = argparse.ArgumentParser()
    add_option_flags(parser, "losses")
    with pytest.raises(SystemExit):
        parser.parse_args(["x.png", "--tile", "big"])
    assert "argument --tile: 'big': expected auto, off or a side in pixels" in \
        capsys.readouterr().err
