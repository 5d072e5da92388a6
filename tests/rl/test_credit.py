"""Credit criteria against per-row NumPy loops written from the formulas in REFERENCE.md."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from tsched.rl import credit

CFG = ConfigDict(dict(alpha=0.4, kappa=2.0, d3s_max_drop=0.7, d3s_scope="response", empg_k=1.0, empg_k_f=1.0,
                      empg_zeta=0.1))
STRATEGIES = ["uniform", "tp", "forking", "entropy_adv", "forking_batch", "d3s", "empg"]
F32 = np.float32


def make_batch(seed=0, N=9, T=12):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, T + 1, size=N)
    lengths[0], lengths[1], lengths[2] = 0, 1, T  # all-padding row, length-1 row, full row
    mask = np.arange(T)[None, :] < lengths[:, None]
    adv = rng.normal(size=N).astype(np.float32)
    adv[3] = 0.0
    ent = rng.random((N, T)).astype(np.float32)
    ent[4, :4] = 0.5  # ties
    return adv, mask, ent


def ref(strategy, r, adv, mask, ent):
    r = np.float32(r)
    N, T = mask.shape
    sel = np.zeros_like(mask)
    tadv = np.zeros((N, T), np.float32)
    for i in range(N):
        L = int(mask[i].sum())
        if strategy == "uniform":
            sel[i, :L] = True
            tadv[i, :L] = adv[i]
        elif strategy == "tp":
            cut = min(int(np.floor(np.float32(r) * np.float32(L))), L - 1)
            sel[i, max(cut, 0):L] = True
            tadv[i] = adv[i] * sel[i]
        elif strategy == "forking":
            k = min(max(int(np.ceil(np.float32(1.0 - r) * np.float32(L))), 0), L)
            order = sorted(range(L), key=lambda t: (-ent[i, t], t))[:k]
            sel[i, order] = True
            tadv[i] = adv[i] * sel[i]
        elif strategy == "d3s":
            k = min(max(int(np.ceil((F32(1) - F32(CFG.d3s_max_drop) * r) * F32(L))), 0), L)
            order = sorted(range(L), key=lambda t: (-(abs(adv[i]) * ent[i, t]), t))[:k]
            sel[i, order] = True
            tadv[i] = adv[i] * sel[i]
        elif strategy == "entropy_adv":
            sel[i, :L] = True
            for t in range(L):
                tadv[i, t] = adv[i] + r * min(CFG.alpha * ent[i, t], abs(adv[i]) / CFG.kappa)
    if strategy in ("forking_batch", "d3s_batch"):
        tokens = [(i, t) for i in range(N) for t in range(T) if mask[i, t]]  # row-major order
        frac = F32(1.0 - r) if strategy == "forking_batch" else F32(1) - F32(CFG.d3s_max_drop) * r
        score = (lambda i, t: ent[i, t]) if strategy == "forking_batch" else (lambda i, t: abs(adv[i]) * ent[i, t])
        k = min(max(int(np.ceil(frac * F32(len(tokens)))), 0), len(tokens))
        for i, t in sorted(tokens, key=lambda it: -score(*it))[:k]:  # stable sort: ties stay row-major
            sel[i, t] = True
        tadv = adv[:, None] * sel
    if strategy == "empg":
        sel, tadv = ref_empg(r, adv, mask, ent)
    return sel, tadv


def ref_empg(r, adv, mask, ent):
    """EMPG per token, from the formula: batch min-max entropy, g = exp(-k Hn) / mean, next-token bonus."""
    N, T = mask.shape
    valid = [float(ent[i, t]) for i in range(N) for t in range(T) if mask[i, t]]
    tadv = np.zeros((N, T))
    if not valid:
        return mask.copy(), tadv
    lo, hi = min(valid), max(valid)
    hn = lambda i, t: (float(ent[i, t]) - lo) / (hi - lo + 1e-8)
    mean_e = sum(math.exp(-CFG.empg_k * (h - lo) / (hi - lo + 1e-8)) for h in valid) / len(valid)
    for i in range(N):
        L = int(mask[i].sum())
        for t in range(L):
            g = math.exp(-CFG.empg_k * hn(i, t)) / (mean_e + 1e-8)
            bonus = math.exp(-CFG.empg_k_f * hn(i, t + 1)) if t + 1 < L else 0.0
            shaped = g * float(adv[i]) + CFG.empg_zeta * bonus
            tadv[i, t] = float(adv[i]) + float(r) * (shaped - float(adv[i]))
    return mask.copy(), tadv


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("r", [0.0, 0.1, 0.25, 0.5, 0.7, 0.99, 1.0])
def test_against_reference(strategy, r):
    adv, mask, ent = make_batch(int(r * 100))
    sel, tadv = credit.allocate(strategy, jnp.float32(r), adv, mask, ent, CFG)
    want_sel, want_adv = ref(strategy, r, adv, mask, ent)
    np.testing.assert_array_equal(np.asarray(sel), want_sel)
    np.testing.assert_allclose(np.asarray(tadv), want_adv, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_all_padding_batch_selects_nothing(strategy):
    adv, mask, ent = make_batch(1)
    mask[:] = False
    sel, tadv = credit.allocate(strategy, jnp.float32(0.5), adv, mask, ent, CFG)
    assert not np.asarray(sel).any()
    assert np.all(np.asarray(tadv) == 0)  # also: no nan from empty min / max / means


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_jit_compiles_once_for_all_magnitudes(strategy):
    adv, mask, ent = make_batch(4)
    f = jax.jit(lambda r: credit.allocate(strategy, r, adv, mask, ent, CFG))
    for r in (0.0, 0.3, 1.0):
        got = f(jnp.float32(r))
        want = credit.allocate(strategy, jnp.float32(r), adv, mask, ent, CFG)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-6, atol=1e-7)
    assert f._cache_size() == 1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_magnitude_zero_is_plain_grpo(strategy):
    """r = 0: every valid token selected, each with its response's advantage (written out, not taken from
    the `uniform` criterion, which is itself under test)."""
    adv, mask, ent = make_batch(7)
    sel, tadv = credit.allocate(strategy, jnp.float32(0.0), adv, mask, ent, CFG)
    np.testing.assert_array_equal(np.asarray(sel), mask)
    np.testing.assert_array_equal(np.asarray(tadv), np.where(mask, adv[:, None], 0.0))


def test_tp_keeps_at_least_the_last_token_and_only_the_tail():
    adv, mask, ent = make_batch(3)
    sel, _ = credit.allocate("tp", jnp.float32(0.99), adv, mask, ent, CFG)
    sel = np.asarray(sel)
    for i in range(len(mask)):
        L = int(mask[i].sum())
        if L:
            assert sel[i, L - 1] and sel[i].sum() == L - min(math.floor(np.float32(0.99) * np.float32(L)), L - 1)
            first = np.argmax(sel[i])
            assert sel[i, first:L].all()  # a contiguous suffix
        else:
            assert not sel[i].any()


def test_entropy_adv_never_flips_sign_and_is_zero_for_zero_advantage():
    adv, mask, ent = make_batch(5)
    ent = ent * 100  # large entropies: the |A| / kappa cap must bind
    _, tadv = credit.allocate("entropy_adv", jnp.float32(1.0), adv, mask, ent, CFG)
    tadv = np.asarray(tadv)
    for i in range(len(adv)):
        row = tadv[i][mask[i]]
        assert np.all(np.sign(row) == np.sign(adv[i])) or adv[i] == 0
        assert np.all(np.abs(row) <= abs(adv[i]) * (1 + 1 / CFG.kappa) + 1e-6)
    assert np.all(tadv[3] == 0)


def test_entropy_adv_bonus_has_no_gradient_through_entropy():
    adv, mask, ent = make_batch(2)
    g = jax.grad(lambda e: jnp.sum(credit.allocate("entropy_adv", jnp.float32(0.5), adv, mask, e, CFG)[1]))(ent)
    assert np.all(np.asarray(g) == 0)


@pytest.mark.parametrize("strategy", ["forking", "forking_batch", "d3s"])
@pytest.mark.parametrize("seed", range(6))
def test_selection_with_many_ties_takes_earliest_first(strategy, seed):
    adv, mask, _ = make_batch(seed, N=16, T=20)
    ent = np.random.default_rng(seed).choice([0.0, 0.5, 1.0], size=mask.shape).astype(np.float32)
    for r in (0.2, 0.5, 0.8):
        sel, tadv = credit.allocate(strategy, jnp.float32(r), adv, mask, ent, CFG)
        want_sel, want_adv = ref(strategy, r, adv, mask, ent)
        np.testing.assert_array_equal(np.asarray(sel), want_sel)
        np.testing.assert_allclose(np.asarray(tadv), want_adv, rtol=1e-6)


@pytest.mark.parametrize("r", [0.0, 0.3, 0.8, 1.0])
def test_d3s_batch_scope_against_reference(r):
    adv, mask, ent = make_batch(int(r * 10) + 20)
    cfg = ConfigDict({**CFG.to_dict(), "d3s_scope": "batch"})
    sel, tadv = credit.allocate("d3s", jnp.float32(r), adv, mask, ent, cfg)
    want_sel, want_adv = ref("d3s_batch", r, adv, mask, ent)
    np.testing.assert_array_equal(np.asarray(sel), want_sel)
    np.testing.assert_allclose(np.asarray(tadv), want_adv, rtol=1e-6)
    positive = mask & (np.abs(adv)[:, None] * ent > 0)
    if np.asarray(sel)[3].any():  # the zero-advantage row only gets tokens once every positive score is in
        assert np.asarray(sel)[positive].all()


def test_forking_batch_threshold_is_batch_level():
    # Row 0 holds every high-entropy token: the batch-level top 50% takes all of row 0 and none of row 1,
    # where per-response forking takes half of each row.
    ent = np.array([[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4]], np.float32)
    mask = np.ones((2, 4), bool)
    adv = np.array([1.0, -1.0], np.float32)
    sel, _ = credit.allocate("forking_batch", jnp.float32(0.5), adv, mask, ent, CFG)
    np.testing.assert_array_equal(np.asarray(sel), [[True] * 4, [False] * 4])
    sel, _ = credit.allocate("forking", jnp.float32(0.5), adv, mask, ent, CFG)
    np.testing.assert_array_equal(np.asarray(sel), [[True, True, False, False], [False, False, True, True]])


def test_empg_zero_advantage_constant_entropy_and_last_token():
    # Constant entropies: Hn = 0, g = 1, bonus zeta on every token but the last of each response; a zero
    # advantage still gets the bonus (EMPG's future-clarity term does not depend on A).
    mask = np.arange(5)[None, :] < np.array([5, 1, 3])[:, None]
    ent = np.full((3, 5), 0.7, np.float32)
    adv = np.array([0.0, 2.0, -1.0], np.float32)
    _, tadv = credit.allocate("empg", jnp.float32(1.0), adv, mask, ent, CFG)
    want = np.array([[0.1, 0.1, 0.1, 0.1, 0.0], [2.0, 0, 0, 0, 0], [-0.9, -0.9, -1.0, 0, 0]])
    np.testing.assert_allclose(np.asarray(tadv), want, rtol=1e-6, atol=1e-7)


def test_empg_scale_has_unit_mean_and_favours_confident_tokens():
    adv, mask, ent = make_batch(11)
    cfg = ConfigDict({**CFG.to_dict(), "empg_zeta": 0.0})
    ones = np.ones_like(adv)
    _, g = credit.allocate("empg", jnp.float32(1.0), ones, mask, ent, cfg)  # A = 1, no bonus: A' = g
    g = np.asarray(g)
    assert g[mask].mean() == pytest.approx(1.0, rel=1e-5)
    lo, hi = np.unravel_index(np.argmin(np.where(mask, ent, np.inf)), ent.shape), \
        np.unravel_index(np.argmax(np.where(mask, ent, -np.inf)), ent.shape)
    assert g[lo] == pytest.approx(np.e * g[hi], rel=1e-5)  # exp(-k * 0) / exp(-k * 1), k = 1


def test_new_criteria_have_no_gradient_through_entropy():
    adv, mask, ent = make_batch(2)
    for strategy in ("empg", "d3s", "forking_batch"):
        g = jax.grad(lambda e: jnp.sum(credit.allocate(strategy, jnp.float32(0.5), adv, mask, e, CFG)[1]))(ent)
        assert np.all(np.asarray(g) == 0)
