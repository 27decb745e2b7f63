"""Presets: the declaration, its docs table, and --preset reaching the engine (in-process and
through the service), with explicit options winning and unknown names refused."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from conftest import noise, png

from gramstyle import presets
from gramstyle.cli import main
from gramstyle.options import DEFAULT_STYLE_LAYERS, StyleOptions
from gramstyle.presets import PRESET_NAMES, PRESET_OPTIONS, PRESETS, preset_values

ROOT = Path(__file__).resolve().parents[2]


def test_docs_presets_table_matches_the_declarations():
    text = (ROOT / "docs" / "options.md").read_text()
    match = re.search(r"<!-- presets-table[^>]*-->\n(.*?)\n<!-- /presets-table -->", text, re.S)
    assert match, "docs/options.md lost its generated presets-table markers"
    assert match.group(1) == presets.markdown_table(), (
        "docs/options.md is out of date: paste gramstyle.presets.markdown_table()")


def test_the_issue_names_and_every_preset_is_complete_and_valid():
    assert PRESET_NAMES == ("faithful", "balanced", "painterly")
    for preset in PRESETS:
        assert set(preset.values) == set(PRESET_OPTIONS), preset.name
        StyleOptions(**preset.values).validated()  # raises on a bad value


def test_balanced_is_todays_default():
    balanced = StyleOptions(**presets.preset_named("balanced").values).validated()
    # Equal layer weights, spelled out (so that switching from another preset resets them);
    # unset, the engine weighs the layers equally too.
    assert balanced.style_layer_weights == (1.0,) * len(balanced.style_layers)
    assert dataclasses.replace(balanced, style_layer_weights=None) == StyleOptions().validated()


def test_painterly_leans_to_larger_structure_than_balanced():
    def deep_share(values):  # the weight on relu4_1 and relu5_1, of all style layers
        weights = values["style_layer_weights"]
        return sum(weights[3:]) / sum(weights)

    painterly = presets.preset_named("painterly").values
    balanced = presets.preset_named("balanced").values
    assert painterly["style_layers"] == balanced["style_layers"] == DEFAULT_STYLE_LAYERS
    # The study (docs/quality.md): larger strokes come from coarse-to-fine, not from deep
    # layer weights; faithful leans to the fine layers.
    assert deep_share(painterly) >= deep_share(balanced) > deep_share(
        presets.preset_named("faithful").values)
    assert painterly["style_weight"] > balanced["style_weight"]
    assert painterly["style_scale"] > balanced["style_scale"]
    assert painterly["scales"] > balanced["scales"]


def test_explicit_options_win_and_scope_filters():
    values = preset_values("painterly", {"style_weight": 7.0, "size": 64})
    assert values["style_weight"] == 7.0 and values["size"] == 64
    assert values["style_scale"] == 1.5 and values["scales"] == 4
    # ComputeLosses takes only the objective's options: no scales, no iterations.
    losses = preset_values("painterly", {}, "losses")
    assert losses["style_scale"] == 1.5 and "scales" not in losses and "iterations" not in losses
    assert preset_values(None, {"tv_weight": 2.0}) == {"tv_weight": 2.0}


def test_other_layers_drop_the_presets_layer_weights():
    values = preset_values("painterly", {"style_layers": ("relu1_1", "relu2_1")})
    assert values["style_layers"] == ("relu1_1", "relu2_1")
    assert "style_layer_weights" not in values
    StyleOptions(**values).validated()  # weights default to equal for the two layers
    given = {"style_layers": ("relu1_1", "relu2_1"), "style_layer_weights": (1.0, 3.0)}
    assert preset_values("painterly", given)["style_layer_weights"] == (1.0, 3.0)


def test_unknown_preset_names_the_field_and_the_choices():
    with pytest.raises(ValueError, match=r"^preset: must be one of faithful, balanced, "
                                         r"painterly, got 'loud'$"):
        preset_values("loud")


# ---------------------------------------------------------------------------- through the CLI

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("preset-images")
    paths = {}
    for name, seed in (("content", 1), ("style", 2), ("candidate", 3)):
        paths[name] = folder / f"{name}.png"
        paths[name].write_bytes(png(noise(40, 32, seed)))
    return paths


def _use_engine(monkeypatch, module, engine):
    monkeypatch.setattr(module, "load_engine", lambda args: engine)


def test_stylize_preset_reaches_the_engine_and_explicit_options_win(
        files, random_engine, spy, monkeypatch, tmp_path, capsys):
    from gramstyle.cli import stylize

    _use_engine(monkeypatch, stylize, random_engine)
    calls = spy(random_engine)
    code = main(["stylize", "--content", str(files["content"]), "--style", str(files["style"]),
                 "-o", str(tmp_path / "o.png"), "--preset", "faithful", "--tv-weight", "0.5",
                 "--size", "32", "--iterations", "1", "-q"])
    assert code == 0, capsys.readouterr().err
    options = calls.last().options
    assert options.style_weight == 1.5
    assert options.style_layer_weights == (2.0, 2.0, 1.0, 0.5, 0.5)
    assert options.tv_weight == 0.5  # given: wins over the preset's 1.0
    assert options.iterations == 1 and options.size == 32


def test_losses_preset_sets_only_the_objectives_options(files, random_engine, spy, monkeypatch,
                                                        capsys):
    from gramstyle.cli import losses

    _use_engine(monkeypatch, losses, random_engine)
    calls = spy(random_engine)
    code = main(["losses", str(files["candidate"]), "--content", str(files["content"]),
                 "--style", str(files["style"]), "--preset", "painterly"])
    assert code == 0, capsys.readouterr().err
    options = calls.last("compute_losses").options
    assert options.style_scale == 1.5 and options.style_weight == 10.0
    assert options.style_layer_weights == (1.0, 1.0, 1.0, 1.0, 1.0)


def test_unknown_preset_exits_2_naming_the_flag(files, tmp_path, capsys):
    code = main(["stylize", "--content", str(files["content"]), "-o", str(tmp_path / "o.png"),
                 "--preset", "loud", "-q"])
    assert code == 2
    assert ("gramstyle: error: --preset: must be one of faithful, balanced, painterly, got "
            "'loud'") in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_info_lists_the_presets(capsys):
    assert main(["info"]) == 0
    assert "presets   faithful, balanced, painterly" in capsys.readouterr().out


def test_preset_over_the_service(server, files, random_engine, spy, tmp_path, capsys):
    """With --server, the preset travels as the options it stands for."""
    calls = spy(random_engine)
    code = main(["stylize", "--server", f"127.0.0.1:{server.port}", "--content",
                 str(files["content"]), "--style", str(files["style"]), "-o",
                 str(tmp_path / "o.png"), "--preset", "painterly", "--style-weight", "7",
                 "--size", "96", "--iterations", "1", "-q", "--timeout", "120"])
    assert code == 0, capsys.readouterr().err
    options = calls.last().options
    assert options.style_weight == 7.0  # given
    assert (options.style_scale, options.scales, options.tv_weight) == (1.5, 4, 0.0)
    assert tuple(options.style_layer_weights) == (1.0, 1.0, 1.0, 1.0, 1.0)
