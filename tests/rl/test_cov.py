"""Clip-Cov and KL-Cov against NumPy loops written from the formulas (Cui et al. 2505.22617, verl)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsched.config import base_config
from tsched.rl import losses, objective

F32 = np.float32


def make_batch(seed=0, N=16, T=24, ties=False):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, T + 1, size=N)
    lengths[0], lengths[1], lengths[2] = 0, 1, T  # all-padding row, length-1 row, full row
    mask = np.arange(T)[None, :] < lengths[:, None]
    adv = np.repeat(rng.normal(size=(N, 1)) * 2, T, axis=1).astype(np.float32) * mask
    adv[3] = 0.0  # a zero-advantage response
    logp = (rng.normal(size=(N, T)) * 2 - 2).astype(np.float32)
    if ties:
        logp = np.round(logp).astype(np.float32)  # few distinct values: equal covariances
    old = (logp + rng.normal(size=(N, T)) * 0.1).astype(np.float32)
    return logp, old, adv, mask


def ref_cov(adv, logp, mask):
    idx = [(i, t) for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t]]
    cov = np.zeros(mask.shape)
    if idx:
        ma = sum(float(adv[it]) for it in idx) / len(idx)
        ml = sum(float(logp[it]) for it in idx) / len(idx)
        for it in idx:
            cov[it] = (float(adv[it]) - ma) * (float(logp[it]) - ml)
    return idx, cov


def ref_count(ratio, n):
    return max(1, math.floor(F32(ratio) * F32(n))) if n else 0


def test_covariance_against_reference():
    logp, old, adv, mask = make_batch(0)
    _, want = ref_cov(adv, logp, mask)
    np.testing.assert_allclose(np.asarray(losses.covariance(adv, logp, mask)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio,beta", [(2e-4, 1.0), (0.1, 1.0), (0.3, 0.1), (1.0, 2.0)])
@pytest.mark.parametrize("ties", [False, True])
def test_kl_cov_against_reference(ratio, beta, ties):
    logp, old, adv, mask = make_batch(1, ties=ties)
    loss, picked = losses.kl_cov(logp, old, adv, mask, ratio, beta)
    idx, cov = ref_cov(adv, logp, mask)
    k = ref_count(ratio, len(idx))
    top = sorted(idx, key=lambda it: -cov[it])[:k]  # stable sort: equal covariances stay row-major
    want_picked = np.zeros_like(mask)
    for it in top:
        want_picked[it] = True
    np.testing.assert_array_equal(np.asarray(picked), want_picked)
    lr = logp.astype(np.float64) - old
    want = -adv * np.exp(lr) + np.where(want_picked, beta * np.abs(lr), 0.0)
    np.testing.assert_allclose(np.asarray(loss)[mask], want[mask], rtol=1e-5, atol=1e-6)


def test_kl_cov_default_ratio_penalises_one_token_and_none_of_an_empty_batch():
    logp, old, adv, mask = make_batch(2)
    assert int(np.asarray(losses.kl_cov(logp, old, adv, mask, 2e-4, 1.0)[1]).sum()) == 1
    empty = np.zeros_like(mask)
    loss, picked = losses.kl_cov(logp, old, adv, empty, 2e-4, 1.0)
    assert not np.asarray(picked).any() and np.all(np.isfinite(np.asarray(loss)))


def ref_candidates(logp, old, adv, mask, lo, hi, lb, ub):
    _, cov = ref_cov(adv, logp, mask)
    ratio = np.exp(logp.astype(np.float64) - old)
    clipped = -adv * np.clip(ratio, 1 - lo, 1 + hi) > -adv * ratio
    return mask & ~clipped & (cov > lb) & (cov < ub)


@pytest.mark.parametrize("ratio", [2e-4, 0.05, 0.5])
def test_clip_cov_detaches_a_random_subset_of_the_band(ratio):
    logp, old, adv, mask = make_batch(3)
    cand = ref_candidates(logp, old, adv, mask, 0.2, 0.28, 1.0, 5.0)
    assert cand.sum() >= 3  # the batch exercises the band
    want_n = min(ref_count(ratio, mask.sum()), cand.sum())
    ppo = losses.clipped_objective(logp - old, adv, 0.2, 0.28, 3.0)[0]
    picks = []
    for seed in range(3):
        loss, clipped, detached = losses.clip_cov(logp, old, adv, mask, jax.random.key(seed), 0.2, 0.28, 3.0,
                                                  ratio, 1.0, 5.0)
        detached = np.asarray(detached)
        assert detached.sum() == want_n and not (detached & ~cand).any()
        np.testing.assert_allclose(np.asarray(loss), np.where(detached, 0.0, np.asarray(ppo)), rtol=1e-6)
        picks.append(detached)
    # Same key, same pick.
    again = losses.clip_cov(logp, old, adv, mask, jax.random.key(0), 0.2, 0.28, 3.0, ratio, 1.0, 5.0)[2]
    np.testing.assert_array_equal(np.asarray(again), picks[0])


def test_clip_cov_pick_is_uniform_over_candidates():
    logp, old, adv, mask = make_batch(3)
    cand = ref_candidates(logp, old, adv, mask, 0.2, 0.28, 1.0, 5.0)
    draws = 600
    pick = jax.jit(jax.vmap(lambda k: losses.clip_cov(logp, old, adv, mask, k, 0.2, 0.28, 3.0, 0.02, 1.0, 5.0)[2]))
    counts = np.asarray(pick(jax.random.split(jax.random.key(7), draws))).sum(0)
    k = min(ref_count(0.02, mask.sum()), cand.sum())
    p = k / cand.sum()
    assert counts[~cand].sum() == 0
    # Each candidate's count is Binomial(draws, p): within 5 standard deviations.
    assert np.all(np.abs(counts[cand] - draws * p) < 5 * math.sqrt(draws * p * (1 - p)))


def test_clip_cov_empty_band_detaches_nothing():
    logp, old, adv, mask = make_batch(4)
    _, _, detached = losses.clip_cov(logp, old, adv, mask, jax.random.key(0), 0.2, 0.28, 3.0, 0.5, 1e3, 1e4)
    assert not np.asarray(detached).any()


def rl_cfg(loss):
    cfg = base_config().rl
    cfg.loss, cfg.credit.strategy, cfg.credit.normalizer = loss, "uniform", "selected_tokens"
    cfg.credit.clip_cov_ratio = cfg.credit.kl_cov_ratio = 0.1
    return cfg


def test_policy_loss_clip_cov_detached_tokens_have_no_gradient_but_count_in_the_normaliser():
    logp, old, adv, mask = make_batch(3)
    a = adv[:, 0]
    ent = np.zeros_like(logp)
    cfg = rl_cfg("clip_cov")
    key = jax.random.key(1)
    f = lambda lp: objective.policy_loss(cfg, jnp.float32(0.0), lp, ent, a, mask, old_logp=old, key=key)
    g = np.asarray(jax.grad(lambda lp: f(lp)[0])(logp))
    num, den, sums = f(logp)
    detached = np.asarray(losses.clip_cov(logp, old, adv, mask, key, cfg.clip_low, cfg.clip_high, cfg.dual_clip,
                                          0.1, 1.0, 5.0)[2])
    assert detached.any() and np.all(g[detached] == 0)
    assert float(den) == mask.sum()
    assert float(sums["cov_frac"][0]) == detached.sum()
    with pytest.raises(ValueError, match="key"):
        objective.policy_loss(cfg, jnp.float32(0.0), logp, ent, a, mask, old_logp=old)


def test_policy_loss_kl_cov_on_policy_gradient_is_plain_policy_gradient():
    # On-policy (old_logp = None) the ratio is 1 and d|logp - old|/dlogp = sign(0) = 0: gradient -A per token.
    logp, _, adv, mask = make_batch(5)
    a = adv[:, 0]
    g = jax.grad(lambda lp: objective.policy_loss(rl_cfg("kl_cov"), jnp.float32(0.0), lp, jnp.zeros_like(lp), a,
                                                  mask)[0])(logp)
    np.testing.assert_allclose(np.asarray(g), -adv * mask, rtol=1e-6)


def test_kl_cov_gradient_off_policy():
    logp, old, adv, mask = make_batch(6)
    loss_fn = lambda lp: jnp.sum(losses.kl_cov(lp, old, adv, mask, 0.1, 0.5)[0] * mask)
    g = np.asarray(jax.grad(loss_fn)(logp))
    picked = np.asarray(losses.kl_cov(logp, old, adv, mask, 0.1, 0.5)[1])
    lr = logp.astype(np.float64) - old
    want = (-adv * np.exp(lr) + np.where(picked, 0.5 * np.sign(lr), 0.0)) * mask
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
