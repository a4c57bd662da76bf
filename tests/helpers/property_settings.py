"""Hypothesis profiles for the property tests (tests/test_properties_*.py).

``bounded`` (the default, used by ``make test``): few examples, derandomized so every run tries
the same inputs, no example database. ``fuzz`` (``PRUNEKIT_HYPOTHESIS=fuzz``, what ``make fuzz``
sets): ``FUZZ_FACTOR`` times more examples, random seeds, failures remembered in ``.hypothesis/``.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

ENV = "PRUNEKIT_HYPOTHESIS"
FUZZ_FACTOR = 10
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture]

settings.register_profile("bounded", deadline=None, derandomize=True, database=None,
                          print_blob=True, suppress_health_check=_SLOW_OK)
settings.register_profile("fuzz", deadline=None, derandomize=False, print_blob=True,
                          suppress_health_check=_SLOW_OK)


def profile() -> str:
    """The active profile's name, from the environment (``bounded`` unless set)."""
    name = os.environ.get(ENV, "bounded")
    if name not in ("bounded", "fuzz"):
        raise ValueError(f"{ENV} must be 'bounded' or 'fuzz', got {name!r}")
    return name


def examples(n: int) -> int:
    """``n`` examples under ``bounded``, ``FUZZ_FACTOR * n`` under ``fuzz``."""
    return n * FUZZ_FACTOR if profile() == "fuzz" else n


settings.load_profile(profile())
