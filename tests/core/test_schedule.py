"""The automatic coarse-to-fine schedule (``scales`` 0, gramstyle.options.schedule)."""

from __future__ import annotations

import pytest

from gramstyle.errors import FieldError
from gramstyle.options import (
    AUTO_SCALES_ABOVE,
    StyleOptions,
    auto_scales,
    schedule,
    total_iterations,
)


@pytest.mark.parametrize("size", [16, 256, 512, 1000, AUTO_SCALES_ABOVE])
def test_sizes_up_to_the_threshold_run_one_scale(size):
    # docs/benchmarks.md: two scales were worse than one at 384-512 px.
    assert schedule(size, 0, 300) == [(size, 300)]
    assert StyleOptions(size=size).scales == 0 and auto_scales(size) == 1


@pytest.mark.parametrize("size,expected", [
    (1448, [(1024, 300), (1448, 150)]),
    (2048, [(1024, 300), (1448, 150), (2048, 75)]),
    (3000, [(750, 300), (1061, 150), (1500, 75), (2121, 38), (3000, 19)]),
    (4096, [(1024, 300), (1448, 150), (2048, 75), (2896, 38), (4096, 19)]),
])
def test_big_sizes_start_at_most_at_the_threshold_and_halve_the_iterations(size, expected):
    plan = schedule(size, 0, 300)
    assert plan == expected
    assert plan[0][0] <= AUTO_SCALES_ABOVE < plan[1][0]  # the coarsest, then above it
    # Every scale costs about the same: pixels double while iterations halve.
    costs = [side**2 * n for side, n in plan]
    assert max(costs) / min(costs) < 1.1


def test_few_iterations_keep_at_least_one_per_scale():
    assert schedule(4096, 0, 3) == [(1024, 3), (1448, 2), (2048, 1), (2896, 1), (4096, 1)]


def test_explicit_scales_keep_iterations_per_scale():
    assert schedule(4096, 1, 20) == [(4096, 20)]
    assert schedule(512, 3, 10) == [(256, 10), (362, 10), (512, 10)]
    options = StyleOptions(size=512, scales=3, iterations=10).validated()
    assert total_iterations(options) == 30


def test_the_schedule_is_held_to_max_iterations():
    options = StyleOptions(size=4096, iterations=100).validated(max_size=4096,
                                                                max_iterations=10_000)
    assert total_iterations(options) == 100 + 50 + 25 + 12 + 6
    with pytest.raises(FieldError, match=r"iterations: the automatic schedule at size 4096 "
                                         r"runs 193 iterations over 5 scales, more than 150"):
        StyleOptions(size=4096, iterations=100).validated(max_size=4096, max_iterations=150)
    # An unset iterations on a server with a low limit still fits its schedule.
    given = StyleOptions.from_given({"size": 2048}, max_size=2048, max_iterations=300)
    assert total_iterations(given) <= 300
