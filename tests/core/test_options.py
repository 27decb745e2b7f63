"""The option declarations drive everything else: the wire format, the CLI, the docs."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from gramstyle import codec
from gramstyle.cli import build_parser
from gramstyle.options import StyleOptions, enum_choices, flag_of, markdown_table
from gramstyle.v1 import gramstyle_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


def test_docs_options_table_matches_the_declarations():
    text = (ROOT / "docs" / "options.md").read_text()
    match = re.search(r"<!-- options-table[^>]*-->\n(.*?)\n<!-- /options-table -->", text, re.S)
    assert match, "docs/options.md lost its generated table markers"
    assert match.group(1) == markdown_table(), (
        "docs/options.md is out of date: paste gramstyle.options.markdown_table()")


@pytest.mark.parametrize("message, scope", [(pb.StylizeRequest, "stylize"),
                                            (pb.ComputeLossesRequest, "losses")])
def test_every_option_has_its_request_field(message, scope):
    fields = message.DESCRIPTOR.fields_by_name
    for name, spec, _ in StyleOptions.specs(scope):
        # Layer and blend weights ride inside the LayerSet / WeightedImage they weigh.
        wire = spec.of if spec.kind in ("layer_weights", "blend_weights") else name
        assert wire in fields, f"{message.DESCRIPTOR.name} has no field {wire!r} for {name}"
        if spec.kind == "choice":
            assert fields[wire].enum_type is spec.enum.DESCRIPTOR


def test_enum_choices_come_from_the_proto():
    assert enum_choices(pb.Optimizer) == ("lbfgs", "adam")
    assert enum_choices(pb.Init) == ("content", "noise", "style", "image")
    assert enum_choices(pb.ImageFormat) == ("png", "jpeg", "webp")
    assert codec.enum_number(pb.Precision, "precision", "bf16") == pb.PRECISION_BF16
    assert codec.enum_value(pb.Precision, "precision", pb.PRECISION_UNSPECIFIED, "fp32") == "fp32"
    with pytest.raises(ValueError, match="precision: unknown value 9; use one of"):
        codec.enum_value(pb.Precision, "precision", 9, "fp32")
    assert codec.format_name("JPG") == "jpeg"


def test_every_option_is_a_cli_flag_of_stylize_and_loss_options_of_losses():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps them here
    for command, scope in (("stylize", "stylize"), ("losses", "losses")):
        flags = {s for a in commands[command]._actions for s in a.option_strings}
        for name, spec, _ in StyleOptions.specs(scope):
            assert flag_of(name, spec) in flags, f"{command} lacks {flag_of(name, spec)}"
    losses_flags = {s for a in commands["losses"]._actions for s in a.option_strings}
    assert "--iterations" not in losses_flags and "--precision" in losses_flags


def _changed_options() -> StyleOptions:
    """Every option away from its default, so a dropped field cannot go unnoticed."""
    return StyleOptions(
        content_layers=("relu3_2", "relu4_2"), content_layer_weights=(1.0, 2.0),
        style_layers=("relu1_1", "relu2_1"), style_layer_weights=(3.0, 1.0),
        content_blend_weights=(1.0,), style_blend_weights=(2.0, 1.0), content_weight=0.5,
        style_weight=7.0, tv_weight=0.25, init="style", optimizer="adam", iterations=12,
        learning_rate=0.05, seed=-3, size=96, style_scale=0.75, scales=2,
        preserve_colors=True, colour="match", precision="bf16", progress_every=4, tolerance=0.05,
        tile=64)


def test_options_survive_the_wire_both_ways():
    options = _changed_options()
    assert all(getattr(options, f.name) != f.default for f in dataclasses.fields(options))
    request = codec.stylize_request(b"c", [b"s1", b"s2"], options=options)
    assert codec.stylize_options(request) == options
    losses = codec.losses_request(b"x", [b"c"], [b"s1", b"s2"], options=options)
    decoded = codec.losses_options(losses)
    for name, _, default in StyleOptions.specs():
        expected = getattr(options, name) if name in codec.LOSS_OPTIONS else default
        assert getattr(decoded, name) == expected, name


def test_unset_options_take_the_declared_defaults():
    assert codec.stylize_options(pb.StylizeRequest()) == StyleOptions()
    assert codec.losses_options(pb.ComputeLossesRequest()) == StyleOptions()
