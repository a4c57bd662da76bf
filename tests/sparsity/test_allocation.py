import pytest
import torch

from prunekit.sparsity.allocation import allocate, erk, global_counts


def _scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.rand(40, 30, generator=g), "b": torch.rand(20, 10, generator=g) * 0.3, "c": torch.rand(64, generator=g) * 2}


def test_uniform():
    assert set(allocate(_scores(), 0.7).values()) == {0.7}


def test_global_matches_brute_force_sort():
    s = _scores()
    out = allocate(s, 0.6, "global")
    flat = torch.cat([v.flatten() for v in s.values()])
    k = round(0.6 * flat.numel())
    thr = flat.sort().values[k - 1]
    for n, v in s.items():
        assert round(out[n] * v.numel()) == int((v <= thr).sum())
    assert sum(round(out[n] * v.numel()) for n, v in s.items()) == k


def test_global_exact_with_ties_and_cap():
    s = {"a": torch.zeros(100), "b": torch.zeros(50)}
    out = global_counts(s, 75)
    assert round(out["a"] * 100) + round(out["b"] * 50) == 75
    capped = allocate(_scores(), 0.6, "global", cap=0.7)
    assert max(capped.values()) <= 0.7 + 1e-12
    total = sum(v.numel() for v in _scores().values())
    assert sum(round(capped[n] * v.numel()) for n, v in _scores().items()) == round(0.6 * total)


def test_global_cap_unreachable_warns():
    with pytest.warns(UserWarning, match="cap"):
        out = allocate(_scores(), 0.9, "global", cap=0.5)
    assert set(out.values()) == {0.5}


def test_erk_mean_density_and_shape_preference():
    shapes = {"conv": (64, 32, 3, 3), "fc": (10, 1024)}
    out = erk(shapes, 0.8)
    numel = {"conv": 64 * 32 * 9, "fc": 10 * 1024}
    kept = sum((1 - out[n]) * numel[n] for n in shapes)
    assert kept == pytest.approx(0.2 * sum(numel.values()))
    assert out["fc"] < out["conv"]  # fewer parameters per unit of fan -> denser


def test_overrides_and_errors():
    out = allocate(_scores(), 0.5, "uniform", overrides={"^a$": 0.9})
    assert out["a"] == 0.9 and out["b"] == 0.5
    g = allocate(_scores(), 0.5, "global", overrides={"^b$": 0.0})
    total = sum(v.numel() for v in _scores().values())
    assert g["b"] == 0 and sum(round(g[n] * v.numel()) for n, v in _scores().items()) == round(0.5 * total)
    with pytest.raises(ValueError, match="sparsity"):
        allocate(_scores(), 1.0)
    with pytest.raises(ValueError, match="budget"):
        allocate(_scores(), 0.5, "random")
    with pytest.raises(ValueError, match="matches no"):
        allocate(_scores(), 0.5, overrides={"zzz": 0.1})


def test_override_key_that_is_not_a_regex_is_a_value_error():
    # found by the prune() property test: re.error escaped instead of a ValueError
    with pytest.raises(ValueError, match=r"overrides key '\(' is not a regular expression"):
        allocate(_scores(), 0.5, overrides={"(": 0.1})


def test_global_counts_on_many_same_size_layers_equal_a_stable_sort():
    """Same-size layers are searched as one batch: the counts are a brute-force stable sort's
    (ties at the threshold filled in layer order)."""
    g = torch.Generator().manual_seed(0)
    scores = {f"u{i}": torch.randint(0, 7, (3, 3), generator=g).float() for i in range(40)}
    scores.update({f"w{i}": torch.randint(0, 7, (5,), generator=g).float() for i in range(5)})
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    owner = torch.cat([torch.full((scores[n].numel(),), i) for i, n in enumerate(names)])
    for to_prune in (1, 77, 200, flat.numel() - 1):
        chosen = owner[torch.sort(flat, stable=True).indices[:to_prune]]
        expected = {n: int((chosen == i).sum()) / scores[n].numel() for i, n in enumerate(names)}
        assert global_counts(scores, to_prune) == expected
