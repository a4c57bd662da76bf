import math

import pytest

from prunekit.training.schedules import Constant, Cubic, Cyclical, OneShot, ThresholdSchedule, lats_epoch, pgh, s_lats, sine


def test_threshold_fractions_match_spec_table():
    table = {  # fraction of D reached at window progress x (Chen et al. 2023, arXiv 2302.13019)
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


def test_cubic_is_zhu_and_gupta_equation_1():
    # s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))^3 for t in {t0, t0 + dt, ..., t0 + n dt}; s_f after
    t0, dt, n, s_i, s_f = 30, 7, 12, 0.2, 0.85
    g = Cubic(s_f, total_steps=200, start=t0, end=t0 + n * dt + 1, every=dt, initial=s_i)
    for t in range(200):
        if t < t0:
            expected = 0.0  # dense before the ramp
        elif t <= t0 + n * dt:
            grid = t0 + (t - t0) // dt * dt  # masks change only on the dt grid
            expected = s_f + (s_i - s_f) * (1 - (grid - t0) / (n * dt)) ** 3
        else:
            expected = s_f
        assert abs(g(t) - expected) < 1e-12, t
    assert g(t0 + n * dt) == s_f and g(t0 + n * dt - 1) < s_f


def test_cyclical_is_srinivas_et_al_cubic_restarted_every_cycle():
    # cycle c of length L from T_s: s = s_f + (s_i^c - s_f) * (1 - tau)^3, tau on the dt grid, reaching 1
    # at the cycle's last update; dense before T_s, s_f held from T_e on
    T, T_s, C, L, dt, s_f, s_i = 400, 40, 3, 91, 10, 0.9, (0.0, 0.3, 0.5)
    c = Cyclical(s_f, T, cycles=C, start=T_s, end=T_s + C * L, every=dt, initial=s_i)
    n = (L - 1) // dt  # 9 updates after the cycle's first step
    for t in range(T):
        if t < T_s:
            expected = 0.0
        elif t >= T_s + C * L:
            expected = s_f
        else:
            k, r = divmod(t - T_s, L)
            tau = min(r // dt / n, 1.0)
            expected = s_f + (s_i[k] - s_f) * (1 - tau) ** 3
        assert abs(c(t) - expected) < 1e-12, t
    assert [c(T_s + k * L) for k in range(C)] == pytest.approx(s_i, abs=1e-15)  # each cycle restarts at its s_i
    assert [c(T_s + k * L + n * dt) for k in range(C)] == [s_f] * C  # and ends exactly on s_f


def test_short_runs_get_an_update_interval_that_fits():
    g = Cubic(final=0.9, total_steps=10)
    assert g.every == 1 and g(0) == 0.0 and g(9) == 0.9
    assert all(a < b for a, b in zip([g(t) for t in range(10)], [g(t) for t in range(1, 10)]))
    c = Cyclical(final=0.9, total_steps=20, cycles=3)  # window [2, 14): three cycles of 4 steps
    assert c.every == 1 and [c(t) for t in (2, 5, 6, 9, 10, 13)] == [0.0, 0.9, 0.0, 0.9, 0.0, 0.9]
    assert Cubic(0.9, 400).every == 20 and Cubic(0.9, 100_000).every == 50  # about 20 updates, at most every 50
    assert Cyclical(0.9, 1000, cycles=4).every == 7  # cycles of 150 steps


def test_a_too_coarse_interval_names_the_schedule_and_every():
    with pytest.raises(ValueError, match=r"^Cubic\(total_steps=10\): the ramp \[0, 10\) has 10 steps, too short for "
                                         r"every=50 .* pass every=9 or less") as err:
        Cubic(0.9, total_steps=10, every=50)
    assert "cycle" not in str(err.value)
    with pytest.raises(ValueError, match=r"^Cyclical\(total_steps=100, cycles=8\): each cycle has 7 steps, too short "
                                         r"for every=10"):
        Cyclical(0.9, 100, cycles=8, every=10)
    with pytest.raises(ValueError, match=r"^Cubic\(total_steps=1\): the ramp \[0, 1\) has 1 step, too short.*"
                                         r"lengthen the pruning window$"):
        Cubic(0.9, total_steps=1)
    with pytest.raises(ValueError, match=r"every \(steps between mask updates\) must be an integer >= 1, got 0"):
        Cyclical(0.9, 100, every=0)
