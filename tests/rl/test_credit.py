"""Credit criteria against per-row NumPy loops written from the formulas in REFERENCE.md."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from tsched.rl import credit

CFG = ConfigDict(dict(alpha=0.4, kappa=2.0))
STRATEGIES = ["uniform", "tp", "forking", "entropy_adv"]


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
        elif strategy == "entropy_adv":
            sel[i, :L] = True
            for t in range(L):
                tadv[i, t] = adv[i] + r * min(CFG.alpha * ent[i, t], abs(adv[i]) / CFG.kappa)
    return sel, tadv


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("r", [0.0, 0.1, 0.25, 0.5, 0.7, 0.99, 1.0])
def test_against_reference(strategy, r):
    adv, mask, ent = make_batch(int(r * 100))
    sel, tadv = credit.allocate(strategy, jnp.float32(r), adv, mask, ent, CFG)
    want_sel, want_adv = ref(strategy, r, adv, mask, ent)
    np.testing.assert_array_equal(np.asarray(sel), want_sel)
    np.testing.assert_allclose(np.asarray(tadv), want_adv, rtol=1e-6, atol=1e-7)


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


@pytest.mark.parametrize("seed", range(6))
def test_forking_with_many_ties_takes_earliest_first(seed):
    adv, mask, _ = make_batch(seed, N=16, T=20)
    ent = np.random.default_rng(seed).choice([0.0, 0.5, 1.0], size=mask.shape).astype(np.float32)
    for r in (0.2, 0.5, 0.8):
        sel, tadv = credit.allocate("forking", jnp.float32(r), adv, mask, ent, CFG)
        want_sel, want_adv = ref("forking", r, adv, mask, ent)
        np.testing.assert_array_equal(np.asarray(sel), want_sel)
        np.testing.assert_allclose(np.asarray(tadv), want_adv, rtol=1e-6)
