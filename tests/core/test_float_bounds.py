"""Every numeric option at the limits of its type, in-process (issue 18 item 8): a
FieldError (ValueError) naming the option, or a sane value; never an overflow later."""

from __future__ import annotations

import math
import sys

import pytest

from gramstyle.cli import main
from gramstyle.errors import FieldError
from gramstyle.options import (
    FLOAT32_MAX,
    FLOAT32_TINY,
    MAX_LEARNING_RATE,
    StyleOptions,
    check_float,
)

NUMERIC = [name for name, spec, _ in StyleOptions.specs() if spec.kind in ("int", "float")]
FLOATS = [name for name, spec, _ in StyleOptions.specs() if spec.kind == "float"]
#: Values no numeric option takes: over float32, float64's largest, infinities, NaN.
REFUSED = [3.5e38, sys.float_info.max, math.inf, -math.inf, math.nan, -1e-30 * 1e10]
TINY = [5e-324, 1e-40, FLOAT32_TINY / 2, -0.0]


@pytest.mark.parametrize("value", REFUSED, ids=repr)
@pytest.mark.parametrize("name", NUMERIC)
def test_out_of_range_values_are_refused_naming_the_option(name, value):
    with pytest.raises(FieldError) as info:
        StyleOptions(**{name: value}).validated()
    assert info.value.field == name and str(info.value).startswith(f"{name}: ")
    assert info.value.value is value or math.isnan(value)


@pytest.mark.parametrize("value", REFUSED, ids=repr)
def test_out_of_range_weights_are_refused_naming_the_item(value):
    for name, given in (("content_layer_weights[0]", {"content_layer_weights": (value,)}),
                        ("style_layer_weights[1]", {"style_layers": ("relu1_1", "relu2_1"),
                                                    "style_layer_weights": (1.0, value)}),
                        ("style_blend_weights[0]", {"style_blend_weights": (value,)})):
        with pytest.raises(FieldError) as info:
            StyleOptions(**given).validated()
        assert info.value.field == name


@pytest.mark.parametrize("value", TINY, ids=repr)
def test_tiny_values_and_negative_zero_count_as_zero(value):
    options = StyleOptions(content_weight=value, style_weight=value, tv_weight=value,
                           tolerance=value, content_blend_weights=(value, 1.0)).validated()
    for number in (options.content_weight, options.style_weight, options.tv_weight,
                   options.tolerance, options.content_blend_weights[0]):
        assert number == 0.0 and math.copysign(1.0, number) == 1.0
    for name in ("learning_rate", "style_scale"):  # must be > 0
        with pytest.raises(FieldError) as info:
            StyleOptions(**{name: value}).validated()
        assert info.value.field == name
    # An integer option takes no float, however small.
    with pytest.raises(FieldError, match=r"^iterations: must be between 1 and 10000, got "):
        StyleOptions(iterations=value).validated()


def test_the_largest_allowed_values():
    options = StyleOptions(content_weight=FLOAT32_MAX, style_weight=FLOAT32_MAX,
                           tv_weight=FLOAT32_MAX, learning_rate=MAX_LEARNING_RATE, tolerance=1,
                           style_scale=4.0, seed=2**63 - 1, iterations=10_000).validated()
    assert (options.content_weight, options.learning_rate, options.tolerance) == (
        FLOAT32_MAX, MAX_LEARNING_RATE, 1.0)
    for name, value, message in (
            ("tolerance", 1.5, "tolerance: must be at most 1, got 1.5"),
            ("learning_rate", 2e6, "learning_rate: must be at most 1e+06, got 2000000.0"),
            ("tv_weight", 3.5e38, "tv_weight: must be at most 3.40282e+38 (the largest "
                                  "float32), got 3.5e+38"),
            ("learning_rate", 0.0, "learning_rate: must be > 0, got 0.0"),
            ("learning_rate", math.nan, "learning_rate: must be a finite number > 0, got nan"),
            ("learning_rate", 1e-320, "learning_rate: must be at least 1.17549e-38 (the "
                                      "smallest normal float32), got 1e-320"),
            ("style_scale", 1e300, "style_scale: must be at most 3.40282e+38 (the largest "
                                   "float32), got 1e+300"),
            ("seed", 2**63, "seed: must be a 64-bit integer, got 9223372036854775808")):
        with pytest.raises(FieldError) as info:
            StyleOptions(**{name: value}).validated()
        assert str(info.value) == message


def test_check_float_rejects_what_float_cannot_read():
    with pytest.raises(FieldError, match=r"^w: must be a number, got 'x'$"):
        check_float("w", "x")
    with pytest.raises(FieldError, match=r"^w: must be a number, got "):
        check_float("w", 10**400)  # float() overflows


@pytest.mark.parametrize("value", [3.5e38, math.inf, math.nan], ids=repr)
@pytest.mark.parametrize("name", FLOATS)
def test_the_in_process_engine_refuses_them_with_value_error(random_engine, images, name,
                                                             value):
    with pytest.raises(ValueError) as info:
        random_engine.stylize([images["cat"]], [images["starry"]],
                              StyleOptions(**{name: value}, size=32, iterations=1))
    assert str(info.value).startswith(f"{name}: ")


def test_cli_lr_over_the_bound_exits_2_naming_the_flag(images, tmp_path, capsys):
    """The reproduction of issue 18 item 8 in-process: it exited 1."""
    code = main(["stylize", "--content", str(images["cat"]), "--style", str(images["starry"]),
                 "-o", str(tmp_path / "out.png"), "--weights", "random", "--lr", "3.5e38"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "gramstyle: error: --lr: must be at most 1e+06, got 3.5e+38" in err
    assert not (tmp_path / "out.png").exists()
