"""The scheduled objective (`objective.policy_loss`) against NumPy pipelines written from the formulas:
normalisers, the entropy bonus, the KL penalty and which entropies the credit criterion reads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.tiny import set_field
from tsched.config import base_config
from tsched.rl import objective

N, T = 6, 9
LENGTHS = np.array([9, 5, 1, 0, 7, 3])


def make_rl(**fields):
    cfg = base_config()
    for k, v in fields.items():
        set_field(cfg.rl, k, v)
    return cfg.rl


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.arange(T)[None] < LENGTHS[:, None]
    logp = rng.normal(-2, 0.5, (N, T)).astype(np.float32)
    ent = rng.random((N, T)).astype(np.float32) * 2
    adv = np.array([1.0, -1.0, 0.5, 0.0, -2.0, 1.5], np.float32)
    return logp, ent, adv, mask


def loss_value(rl, r, logp, ent, adv, mask, **kw):
    num, den, sums = objective.policy_loss(rl, jnp.float32(r), jnp.asarray(logp), jnp.asarray(ent), jnp.asarray(adv),
                                           jnp.asarray(mask), **kw)
    return float(num) / float(den), sums


def tp_selected(r, mask):
    sel = np.zeros_like(mask)
    for i, L in enumerate(mask.sum(1)):
        if L:
            sel[i, min(int(np.floor(np.float32(r) * np.float32(L))), L - 1):L] = True
    return sel


@pytest.mark.parametrize("normalizer", ["selected_tokens", "valid_tokens"])
def test_normaliser_counts_selected_or_valid_tokens(normalizer):
    """On-policy PPO: every selected token's loss is -A; token-mean divides by the selected tokens or by
    every valid token of the batch."""
    logp, ent, adv, mask = inputs()
    rl = make_rl(**{"credit.strategy": "tp", "credit.normalizer": normalizer})
    got, sums = loss_value(rl, 0.5, logp, ent, adv, mask)
    sel = tp_selected(0.5, mask)
    assert sel.sum() < mask.sum()  # the two normalisers differ here
    num = (-adv[:, None] * sel).sum()
    want = num / (sel.sum() if normalizer == "selected_tokens" else mask.sum())
    assert got == pytest.approx(want, rel=1e-5)
    assert float(sums["tokens_optimized_frac"][0] / sums["tokens_optimized_frac"][1]) == pytest.approx(
        sel.sum() / mask.sum())


def test_entropy_bonus_is_subtracted_and_raises_entropy():
    logp, ent, adv, mask = inputs(1)
    coef = 0.05
    rl = make_rl(entropy_coef=coef, **{"credit.strategy": "uniform"})
    got, _ = loss_value(rl, 0.0, logp, ent, adv, mask)
    want = ((-adv[:, None] - coef * ent) * mask).sum() / mask.sum()
    assert got == pytest.approx(want, rel=1e-5)
    # descending the loss raises every valid token's entropy: d loss / d H = -coef / #tokens
    g = jax.grad(lambda e: objective.policy_loss(rl, jnp.float32(0.0), jnp.asarray(logp), e, jnp.asarray(adv),
                                                 jnp.asarray(mask))[0])(jnp.asarray(ent))
    np.testing.assert_allclose(np.asarray(g), np.where(mask, -coef, 0.0), rtol=1e-6)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalty_to_the_reference_policy(estimator):
    """loss = token-mean(-A + beta KL(pi || pi_ref)), KL estimated per token from (logp, ref_logp):
    k1 = logp - ref, k3 = exp(ref - logp) - (ref - logp) - 1; the gradient reaches logp only."""
    logp, ent, adv, mask = inputs(2)
    ref = logp + np.random.default_rng(3).normal(0, 0.7, (N, T)).astype(np.float32)
    beta = 0.1
    rl = make_rl(kl_coef=beta, kl_estimator=estimator, **{"credit.strategy": "uniform"})
    got, _ = loss_value(rl, 0.0, logp, ent, adv, mask, ref_logp=jnp.asarray(ref))
    d = (ref - logp).astype(np.float64)
    kl = -d if estimator == "k1" else np.exp(d) - d - 1
    want = ((-adv[:, None] + beta * kl) * mask).sum() / mask.sum()
    assert got == pytest.approx(want, rel=1e-5)
    grad = jax.grad(lambda lp: objective.policy_loss(rl, jnp.float32(0.0), lp, jnp.asarray(ent), jnp.asarray(adv),
                                                     jnp.asarray(mask), ref_logp=jnp.asarray(ref))[0])(jnp.asarray(logp))
    dkl = np.ones_like(d) if estimator == "k1" else 1 - np.exp(d)  # d KL / d logp
    # on-policy: d(-A ratio) / d logp = -A
    np.testing.assert_allclose(np.asarray(grad), np.where(mask, -adv[:, None] + beta * dkl, 0.0), rtol=1e-4,
                               atol=1e-6)


def test_credit_reads_the_sampling_policys_entropy_and_old_logp():
    """Off-policy update (old_logp, old_entropy given): forking selects by the sampling policy's entropies,
    not the current ones, and the PPO ratio is against old_logp."""
    logp, ent, adv, mask = inputs(4)
    rng = np.random.default_rng(5)
    old = logp + rng.normal(0, 0.3, (N, T)).astype(np.float32)
    old_ent = rng.random((N, T)).astype(np.float32)
    rl = make_rl(**{"credit.strategy": "forking", "credit.normalizer": "valid_tokens"})
    got, _ = loss_value(rl, 0.5, logp, ent, adv, mask, old_logp=jnp.asarray(old), old_entropy=jnp.asarray(old_ent))
    sel = np.zeros_like(mask)
    for i, L in enumerate(mask.sum(1)):
        k = int(np.ceil(np.float32(0.5) * np.float32(L)))
        sel[i, sorted(range(L), key=lambda t: (-old_ent[i, t], t))[:k]] = True
    ratio = np.exp(logp - old)
    A = adv[:, None] * np.ones((1, T))
    loss = np.maximum(-A * ratio, -A * np.clip(ratio, 1 - rl.clip_low, 1 + rl.clip_high))
    if rl.dual_clip:
        loss = np.where(A < 0, np.minimum(loss, -A * rl.dual_clip), loss)
    assert got == pytest.approx((loss * sel).sum() / mask.sum(), rel=1e-5)
    other, _ = loss_value(rl, 0.5, logp, ent, adv, mask, old_logp=jnp.asarray(old), old_entropy=jnp.asarray(ent))
    assert abs(other - got) > 1e-3  # the selection does depend on which entropies are read
