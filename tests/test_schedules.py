import math

import pytest

from prunekit.schedules import Constant, Cubic, Cyclical, OneShot, ThresholdSchedule, lats_epoch, pgh, s_lats, sine


def test_threshold_fractions_match_spec_table():
    table = {  # spec soft-threshold.md section 4, fraction of D reached at x
        "s_lats": (lambda x: s_lats(x), [.198, .475, .703, .818, .975, .998]),
        "sine": (lambda x: sine(x), [.024, .146, .345, .500, .854, .976]),
        "pgh0.01": (lambda x: pgh(x, 0.01), [.436, .785, .929, .970, .998, 1.0]),
        "pgh100": (lambda x: pgh(x, 100.0), [.039, .135, .291, .431, .834, .982]),
    }
    for name, (f, expected) in table.items():
        for x, e in zip([0.1, 0.25, 0.4, 0.5, 0.75, 0.9], expected):
            assert abs(f(x) - e) < 1.5e-3, (name, x, f(x), e)


def test_pgh_closed_form_against_quadrature_and_beta_one_fallback():
    for beta in (0.01, 0.3, 5.0):
        n = 20000
        integrand = [beta ** ((i + 0.5) / n) * (1 + math.cos(math.pi * (i + 0.5) / n)) / n for i in range(n)]
        total = sum(integrand)
        assert abs(pgh(0.4, beta) - sum(integrand[: int(0.4 * n)]) / total) < 1e-6
    assert pgh(0.3, 1.0) == s_lats(0.3)
    assert abs(pgh(0.3, 1.0 + 1e-4) - s_lats(0.3)) < 1e-4
    with pytest.raises(ValueError, match="beta > 0"):
        pgh(0.3, 0.0)
    with pytest.raises(ValueError, match="beta"):
        ThresholdSchedule("pgh", 100)


@pytest.mark.parametrize("kind,kw", [("s_lats", {}), ("lats", {"steps_per_epoch": 10}), ("pgh", {"beta": 0.01}),
                                     ("pgh", {"beta": 100.0}), ("linear", {}), ("sine", {})])
def test_threshold_schedules_start_at_zero_end_exactly_at_one_and_never_decrease(kind, kw):
    sched = ThresholdSchedule(kind, total_steps=130, start=30, **kw)
    values = [sched(k) for k in range(200)]
    assert values[:31] == [0.0] * 31
    assert values[130] == 1.0 and values[-1] == 1.0
    assert all(b >= a - 1e-15 for a, b in zip(values, values[1:]))
    assert ThresholdSchedule("constant", 10)(0) == 1.0


def test_per_epoch_lats_closed_form_equals_direct_sum():
    E, nb = 7, 5
    for e in range(E + 1):
        direct = sum((1 + math.cos(math.pi * j / E)) for j in range(e)) / (E + 1)
        assert abs(lats_epoch(e, 0, E, nb) - direct) < 1e-12
    assert abs(lats_epoch(E - 1, nb, E, nb) - 1.0) < 1e-12  # the epoch's last increment lands on D


def test_s_lats_lambda_is_flat_under_matching_cosine_lr_and_linear_blows_up():
    S = 1000
    lr = [(1 + math.cos(math.pi * (k + 0.5) / S)) / 2 for k in range(S)]
    lam = {}
    for kind in ("s_lats", "linear", "sine"):
        sched = ThresholdSchedule(kind, S)
        lam[kind] = [(sched(k + 1) - sched(k)) / lr[k] for k in range(S)]
    flat = lam["s_lats"][:-50]  # (the last few steps divide rounding error by lr ~ 0)
    assert max(flat) / min(flat) < 1.001
    assert lam["linear"][-1] / lam["linear"][S // 2] > 1000
    assert lam["sine"][-1] / lam["sine"][S // 2] > 100


def test_cubic_endpoints_and_front_loading():
    g = Cubic(0.9, total_steps=1200, start=100, end=1101, every=10)  # 100 grid updates in the ramp
    assert g(0) == 0.0 and g(99) == 0.0 and g(100) == 0.0
    assert g(1090) < 0.9 and g(1100) == 0.9 and g(5000) == 0.9
    for progress, frac in [(0.1, 0.271), (0.2, 0.488), (0.3, 0.657), (0.5, 0.875)]:
        assert abs(g(100 + round(progress * 1000)) / 0.9 - frac) < 1e-9
    values = [g(t) for t in range(1200)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert len(set(values[100:1100])) == 100  # changes only on the every-10 grid


def test_cyclical_period_resets_and_each_cycle_ends_at_target():
    c = Cyclical(0.95, total_steps=1000, cycles=4, every=10)  # window [100, 700), cycles of 150 steps
    assert (c.start, c.end) == (100, 700)
    for k in range(4):
        b = 100 + 150 * k
        assert c(b) == 0.0  # back to dense at every cycle start
        assert c(b + 140) == 0.95 and c(b + 149) == 0.95  # last grid point of the cycle is the target
        assert 0 < c(b + 10) < c(b + 70) < 0.95
        assert c(b + 37) == c(b + 30)  # the grid period
    assert c(99) == 0.0 and c(700) == 0.95 and c(999) == 0.95
    assert Cyclical(0.9, 1000, cycles=1, start=0, end=1000, every=7)(500) == Cubic(0.9, 1000, every=7)(500)
    lin = Cyclical(0.5, 100, cycles=2, start=0, end=100, every=1, shape="linear", initial=(0.0, 0.2))
    assert lin(50) == 0.2 and lin(99) == 0.5


def test_sparsity_schedule_bad_input():
    with pytest.raises(ValueError, match=r"total_steps \(50\) must be greater than its start \(60\)"):
        Cubic(0.9, total_steps=50, start=60)
    with pytest.raises(ValueError, match=r"must be greater than its start"):
        ThresholdSchedule("s_lats", total_steps=10, start=10)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            Cubic(bad, 100)
    with pytest.raises(ValueError, match="too short"):
        Cyclical(0.9, 100, cycles=8, every=10)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        ThresholdSchedule("lats", 100, steps_per_epoch=7)
    assert OneShot(0.8, at=5)(4) == 0.0 and OneShot(0.8, at=5)(5) == 0.8 and Constant(0.3)(7) == 0.3
