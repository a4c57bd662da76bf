"""benchmarks/_ratio_search.py: the ratio search the torch-pruning peer uses, against brute force."""
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
from _ratio_search import closest_ratio  # noqa: E402


def staircase(channels: int):
    """FLOPs removed by keeping ``channels - floor(r * channels)`` of two coupled layers (quadratic)."""
    return lambda r: 1 - ((channels - math.floor(r * channels)) / channels) ** 2


@pytest.mark.parametrize("channels", [4, 7, 16, 33])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.71])
def test_matches_brute_force_over_a_fine_grid(channels, target):
    f = staircase(channels)
    ratio, got = closest_ratio(f, target, tol=1e-4)
    assert got == f(ratio)
    best = min(abs(f(i / 10000) - target) for i in range(0, 9501))
    assert abs(got - target) == pytest.approx(best, abs=1e-12)


def test_refused_ratios_count_as_too_high():
    def f(r):
        if r > 0.6:
            raise ValueError("would empty a layer")
        return r

    ratio, got = closest_ratio(f, 0.8)
    assert got <= 0.6 and ratio == pytest.approx(0.6, abs=1e-3)


def test_unreachable_targets_return_the_closest_scanned_ratio():
    assert closest_ratio(lambda r: 0.5 * r, 0.9) == (0.95, 0.475)
    assert closest_ratio(lambda r: 0.2 + r, 0.1) == (0.0, 0.2)
    # rises to 0.4 at r = 0.5, then falls: the peak is the closest a scan by 0.05 sees
    assert closest_ratio(lambda r: 0.8 * min(r, 1 - r), 0.6) == (0.5, 0.4)


def test_a_count_that_falls_at_high_ratios_is_found_before_it_falls():
    """torch-pruning's ViT count: a staircase up to ~0.7 removed, then lower where a group is left whole."""
    rising = staircase(16)
    f = lambda r: rising(r) if r < 0.6 else 0.44  # noqa: E731
    ratio, got = closest_ratio(f, 0.5, tol=1e-4)
    best = min(abs(f(i / 10000) - 0.5) for i in range(0, 9501))
    assert ratio < 0.6 and abs(got - 0.5) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("kwargs", [dict(target=0.0), dict(target=1.0), dict(target=0.5, lo=0.5, hi=0.4),
                                    dict(target=0.5, tol=0.0), dict(target=0.5, step=0.0)])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        closest_ratio(lambda r: r, **kwargs)
