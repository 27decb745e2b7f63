"""The image-input table (gramstyle.inputs): it agrees with the proto, and the codec, the CLI
and the sizes are derived from it."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor
from PIL import Image

from gramstyle import codec, inputs
from gramstyle.cli import flag_message
from gramstyle.cli.flags import add_option_flags, check_image_files, image_arguments
from gramstyle.images import ImageError, ImageHeader, encode_image, resize_long_side
from gramstyle.inputs import INPUTS, RPCS, ImageInput, inputs_of
from gramstyle.options import StyleOptions
from gramstyle.v1 import gramstyle_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["StyleTransferService"]


def request_type(rpc: str):
    return SERVICE.methods_by_name[rpc].input_type


def repeated(f: FieldDescriptor) -> bool:
    return f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED


def image_fields(message) -> set[tuple[str, str | None]]:
    """(field, part) of every bytes field of a request: a bytes field of its own (part None),
    or the bytes field ``part`` of the messages a field holds (WeightedImage.data)."""
    found = set()
    for f in message.fields:
        if f.type == f.TYPE_BYTES:
            found.add((f.name, None))
        elif f.message_type is not None:
            found |= {(f.name, g.name) for g in f.message_type.fields if g.type == g.TYPE_BYTES}
    return found


@pytest.mark.parametrize("rpc", RPCS)
def test_table_and_proto_agree(rpc):
    message = request_type(rpc)
    declared = inputs_of(rpc)
    for entry in declared:
        f = message.fields_by_name.get(entry.field)
        assert f is not None, f"{message.name} has no field {entry.field} ({entry.name})"
        assert repeated(f) == entry.repeated, entry.name
        if entry.part is None:
            assert f.type == f.TYPE_BYTES, entry.name
        else:
            part = f.message_type.fields_by_name[entry.part]
            assert part.type == part.TYPE_BYTES and not repeated(part), entry.name
    # Every image a request can carry is declared, for that call.
    assert image_fields(message) == {(e.field, e.part) for e in declared}
    # The images whose options blend them travel as WeightedImage messages.
    for _, spec, _ in StyleOptions.specs():
        if spec.kind == "blend_weights":
            entry = inputs.input_named(spec.of)
            assert rpc not in entry.rpcs or (
                message.fields_by_name[entry.field].message_type.name == "WeightedImage")


def test_every_image_input_has_a_proto_field_in_exactly_its_calls():
    for entry in INPUTS:
        for rpc in RPCS:
            assert (entry.field in request_type(rpc).fields_by_name) == (rpc in entry.rpcs), \
                (entry.name, rpc)


def test_declarations_are_consistent():
    names = [entry.name for entry in INPUTS]
    assert len(set(names)) == len(names)
    for entry in INPUTS:
        if not entry.flag.startswith("--"):  # a positional argument: one, and required
            assert not entry.repeated and entry.required, entry.name
        assert entry.paired_with is None or inputs.input_named(entry.paired_with).repeated
        if entry.only_with:
            option, value = entry.only_with
            spec = dict((n, s) for n, s, _ in StyleOptions.specs())[option]
            assert value in spec.choices
    # The one that fixes the output size is checked first.
    assert [e.name for e in inputs.check_order("ComputeLosses")] == [
        "candidate", "content", "style", "style_mask", "style_source_mask"]
    assert [e.name for e in inputs.check_order("Stylize")] == [
        "content", "style", "style_mask", "style_source_mask", "init_image"]


# ---------------------------------------------------------------------------- codec


def png(width: int, height: int, colour=(200, 30, 30)) -> bytes:
    return encode_image(Image.new("RGB", (width, height), colour), "png")


def test_request_round_trip_follows_the_table():
    a, b, c, d = png(8, 6), png(6, 8), png(5, 5), png(4, 4)
    request = codec.stylize_request([a], [b, c], init_image=d, style_blend_weights=[1, 3])
    no_masks = {"style_mask": [], "style_source_mask": []}
    assert codec.request_images(request) == {"content": [a], "style": [b, c],
                                             "init_image": [d], **no_masks}
    assert codec.engine_images(request) == {"content": [a], "style": [b, c], "init_image": d,
                                            **no_masks}
    assert [image.weight for image in request.style] == [1.0, 3.0]
    assert codec.engine_images(codec.stylize_request([a]))["init_image"] is None

    losses = codec.losses_request(c, style=[b])
    assert codec.engine_images(losses) == {"content": [], "style": [b], "candidate": c,
                                           **no_masks}
    # A required input is there even when missing, so that it is refused as an empty image.
    assert codec.request_images(pb.ComputeLossesRequest())["candidate"] == [b""]
    with pytest.raises(ImageError, match=r"^candidate: expected a path, bytes or PIL image"):
        codec.losses_request(None)
    # An input of the other call is not a keyword of this one.
    with pytest.raises(TypeError, match="unknown option"):
        codec.stylize_request([a], candidate=c)


def test_errors_name_the_input_as_declared(tmp_path):
    missing = str(tmp_path / "missing.png")
    with pytest.raises(ImageError, match=r"^style\[1\]: file not found"):
        codec.stylize_request([png(4, 4)], [png(4, 4), missing])
    with pytest.raises(ImageError, match=r"^init_image: file not found"):
        codec.stylize_request([png(4, 4)], init_image=missing)
    with pytest.raises(ValueError, match=r"^style_blend_weights: expected 1 value\(s\), one "
                                         r"per image, got 2"):
        codec.stylize_request([], [png(4, 4)], style_blend_weights=[1, 2])
    request = pb.StylizeRequest(init=pb.INIT_STYLE, init_image=png(4, 4))
    with pytest.raises(ValueError) as info:
        codec.stylize_options(request)
    assert str(info.value) == ("init_image: given, but init is INIT_STYLE; set init to "
                               "INIT_IMAGE or leave it unspecified")
    codec.stylize_options(pb.StylizeRequest(init=pb.INIT_IMAGE, init_image=png(4, 4)))


MASK = ImageInput("style_mask", "region mask of each --style", ("Stylize",), repeated=True,
                  flag="--style-mask", paired_with="style", memory="output", channels=1)


def test_a_paired_input_needs_one_image_per_image_of_its_pair():
    codec._check_pairs(MASK, 2, {"style": 2})
    codec._check_pairs(MASK, 0, {"style": 2})  # no masks at all: none is needed
    with pytest.raises(ValueError) as info:
        codec._check_pairs(MASK, 1, {"style": 2})
    assert str(info.value) == "style_mask: expected 2 image(s), one per style image, got 1"


# ---------------------------------------------------------------------------- CLI


@pytest.fixture
def with_mask(monkeypatch):
    """The table with its per-style masks replaced by one Stylize-only mask input."""
    table = (*(e for e in INPUTS if e.paired_with is None), MASK)
    monkeypatch.setattr(inputs, "INPUTS", table)
    monkeypatch.setattr(inputs, "_BY_NAME", {e.name: e for e in table})


def parser(scope: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_option_flags(p, scope)
    return p


def test_cli_flags_come_from_the_table(tmp_path, with_mask):
    good = tmp_path / "good.png"
    Image.new("RGB", (12, 8)).save(good)
    args = parser("stylize").parse_args(["--content", str(good), "--style", str(good),
                                         "--style-mask", str(good), "--init-image", str(good)])
    assert image_arguments(args, "stylize") == {
        "content": [str(good)], "style": [str(good)], "init_image": str(good),
        "style_mask": [str(good)]}
    assert check_image_files(args, "stylize") == {
        "content": [(12, 8)], "style": [(12, 8)], "init_image": [(12, 8)],
        "style_mask": [(12, 8)]}
    # The masks are not an input of ComputeLosses; the candidate is its positional argument.
    args = parser("losses").parse_args([str(good), "--style", str(good)])
    assert image_arguments(args, "losses") == {"content": [], "style": [str(good)],
                                               "candidate": str(good)}
    with pytest.raises(SystemExit):
        parser("losses").parse_args([str(good), "--style-mask", str(good)])


def test_cli_file_checks_name_the_flag(tmp_path, with_mask):
    good = tmp_path / "good.png"
    Image.new("RGB", (12, 8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    args = parser("stylize").parse_args(["--style", str(good), "--style-mask", str(good),
                                         "--style-mask", str(bad)])
    with pytest.raises(ImageError) as info:
        check_image_files(args, "stylize")
    assert flag_message(info.value).startswith("--style-mask #2: cannot decode image")
    # The candidate is checked first, before the other files.
    args = parser("losses").parse_args([str(bad), "--content", str(bad)])
    with pytest.raises(ImageError, match=r"^candidate: cannot decode image"):
        check_image_files(args, "losses")


# ---------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 300), (1000, 3)])
def test_output_size_is_the_first_images_resized(size):
    image = Image.new("RGB", size)
    header = ImageHeader("PNG", "RGB", *size)
    other = ImageHeader("PNG", "RGB", 10, 90)
    expected = resize_long_side(image, 128).size
    assert inputs.output_size([image], [other], 128) == expected
    assert inputs.output_size([header], [other], 128) == expected
    assert inputs.output_size([], [header, other], 128) == expected
    assert inputs.output_size([], [], 128) == (128, 128)


def test_resized_size_follows_the_memory_term():
    header = ImageHeader("PNG", "RGB", 300, 200)
    by = {e.name: e for e in INPUTS}
    assert inputs.resized_size(by["content"], header, (64, 48), 2.0) == (64, 48)
    assert inputs.resized_size(by["style"], header, (64, 48), 2.0) == (128, 85)
    assert inputs.resized_size(by["style"], header, (64, 48), 0.01) == (16, 11)  # >= 16 px
    assert inputs.resized_size(by["init_image"], header, (64, 48), 1.0) is None
    assert inputs.resized_size(dataclasses.replace(MASK, memory="style"), header, (64, 48),
                               1.0) == (64, 43)


def test_the_engine_resizes_as_the_table_says(random_engine, images):
    """The engine's objective and the table agree on the size of each resized input."""
    from gramstyle.engine.objective import Objective

    content = Image.open(images["cat"]).convert("RGB")
    style = Image.open(images["starry"]).convert("RGB")
    options = random_engine.validate(StyleOptions(size=48, style_scale=1.5))
    objective = Objective.build(random_engine.extractor, [content], [style], options)
    output = inputs.output_size([content], [style], 48)
    assert (objective.width, objective.height) == output
    by = {e.name: e for e in INPUTS}
    assert tuple(objective.contents[0].shape[-2:])[::-1] == inputs.resized_size(
        by["content"], content, output, 1.5)
    assert tuple(objective.styles[0].shape[-2:])[::-1] == inputs.resized_size(
        by["style"], style, output, 1.5)


def test_docs_inputs_table_matches_the_declarations():
    text = (Path(__file__).resolve().parents[2] / "docs" / "options.md").read_text()
    match = re.search(r"<!-- inputs-table[^>]*-->\n(.*?)\n<!-- /inputs-table -->", text, re.S)
    assert match, "docs/options.md lost its generated inputs-table markers"
    assert match.group(1) == inputs.markdown_table(), (
        "docs/options.md is out of date: paste gramstyle.inputs.markdown_table()")
