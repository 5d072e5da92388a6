"""Eligibility-trace ratios (P-trace / S-trace) against per-row loops written from the docstring formula."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from tsched.config import base_config
from tsched.rl import losses, objective


def make_batch(seed=0, N=7, T=10):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, T + 1, size=N)
    lengths[0], lengths[1], lengths[2] = 0, 1, T  # all-padding row, length-1 row, full row
    mask = np.arange(T)[None, :] < lengths[:, None]
    logp = (rng.normal(size=(N, T)) * 0.3 - 1.0).astype(np.float32)
    old = (logp + rng.normal(size=(N, T)) * 0.2).astype(np.float32)
    ent = rng.random((N, T)).astype(np.float32)
    ent[3, :5] = 0.5  # ties
    return logp, old, mask, ent


def trace_cfg(lam, top):
    return ConfigDict(dict(lam=lam, entropy_top=top))


def ref_trace(logp, old, mask, ent, lam, top):
    """log w_t = sum_{k in S, k <= t} lam^c(k,t) d_k / sum lam^c(k,t), c(k,t) = #{j in S: k < j <= t};
    d_t where no S token is at or before t. S: ceil(top * n) highest-entropy mask tokens (ties: earlier)."""
    N, T = mask.shape
    d = logp.astype(np.float64) - old.astype(np.float64)
    out = np.zeros((N, T))
    for i in range(N):
        valid = [t for t in range(T) if mask[i, t]]
        k = min(int(np.ceil(np.float32(top) * np.float32(len(valid)))), len(valid))
        S = sorted(sorted(valid, key=lambda t: (-ent[i, t], t))[:k])
        for t in range(T):
            hist = [s for s in S if s <= t]
            if not hist:
                out[i, t] = d[i, t]
                continue
            w = [lam ** sum(1 for j in S if s < j <= t) for s in hist]
            out[i, t] = sum(wk * d[i, s] for wk, s in zip(w, hist)) / sum(w)
    return out


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("top", [1.0, 0.5, 0.2])
def test_trace_against_reference(lam, top):
    logp, old, mask, ent = make_batch(int(lam * 10 + top * 100))
    got = losses.trace_log_ratio(logp, old, mask, ent, trace_cfg(lam, top))
    want = ref_trace(logp, old, mask, ent, lam, top)
    np.testing.assert_allclose(np.asarray(got)[mask], want[mask], rtol=1e-5, atol=1e-6)


def test_lam_zero_is_token_ppo():
    logp, old, mask, ent = make_batch(1)
    got = losses.trace_log_ratio(logp, old, mask, ent, trace_cfg(0.0, 1.0))
    want = losses.ppo_log_ratio(logp, old, mask, ent, None)
    np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(want)[mask], rtol=1e-6, atol=1e-7)


def test_lam_one_is_prefix_mean_ending_at_gspo():
    logp, old, mask, ent = make_batch(2)
    got = np.asarray(losses.trace_log_ratio(logp, old, mask, ent, trace_cfg(1.0, 1.0)))
    gspo = np.asarray(losses.gspo_log_ratio(logp, old, mask, ent, None))
    d = logp.astype(np.float64) - old
    for i in range(len(mask)):
        L = int(mask[i].sum())
        for t in range(L):
            assert got[i, t] == pytest.approx(d[i, :t + 1].mean(), rel=1e-5, abs=1e-6)
        if L:
            assert got[i, L - 1] == pytest.approx(gspo[i, L - 1], rel=1e-5, abs=1e-6)


def test_tokens_outside_the_trace_carry_the_last_trace_value():
    # One response, entropies pick tokens 1 and 3 (top 40% of 5); token 0 has no history (own ratio),
    # token 2 carries the value at 1, token 4 the value at 3.
    d = np.array([[0.5, 0.1, -0.3, 0.2, 0.7]], np.float32)
    ent = np.array([[0.0, 1.0, 0.1, 0.9, 0.2]], np.float32)
    mask = np.ones((1, 5), bool)
    got = np.asarray(losses.trace_log_ratio(d, np.zeros_like(d), mask, ent, trace_cfg(0.5, 0.4)))[0]
    at3 = (0.5 * 0.1 + 0.2) / 1.5
    np.testing.assert_allclose(got, [0.5, 0.1, 0.1, at3, at3], rtol=1e-6)


def test_gradient_flows_through_each_tokens_own_logp_only():
    logp, old, mask, ent = make_batch(3)
    w = np.random.default_rng(3).normal(size=mask.shape).astype(np.float32)
    for top in (1.0, 0.3):
        g = jax.grad(lambda lp: jnp.sum(losses.trace_log_ratio(lp, old, mask, ent, trace_cfg(0.8, top)) * w))(logp)
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6)


def test_long_responses_stay_finite_and_exact():
    # T = 4096: a lam^(-t) rescaling trick would overflow float32 here (0.5^-4096). lam is traced, so the
    # two values share one compilation.
    T = 4096
    rng = np.random.default_rng(4)
    d = (rng.normal(size=(1, T)) * 0.1).astype(np.float32)
    mask = np.ones((1, T), bool)
    cfg = lambda lam: SimpleNamespace(lam=lam, entropy_top=1.0)
    f = jax.jit(lambda x, lam: losses.trace_log_ratio(x, jnp.zeros_like(x), mask, x, cfg(lam)))
    for lam in (0.5, 0.999):
        got = np.asarray(f(d, jnp.float32(lam)))
        assert np.all(np.isfinite(got))
        for t in (0, 100, T - 1):
            w = lam ** (t - np.arange(t + 1, dtype=np.float64))
            assert got[0, t] == pytest.approx(np.sum(w * d[0, :t + 1]) / np.sum(w), rel=1e-4, abs=1e-6)


def test_policy_loss_with_trace_and_old_logp_against_numpy():
    logp, old, mask, ent = make_batch(5)
    adv = np.random.default_rng(5).normal(size=len(mask)).astype(np.float32)
    cfg = base_config().rl
    cfg.loss, cfg.credit.strategy, cfg.trace.lam, cfg.trace.entropy_top = "trace", "uniform", 0.7, 0.5
    num, den, _ = objective.policy_loss(cfg, jnp.float32(0.0), logp, ent, adv, mask, old_logp=old)
    ratio = np.exp(ref_trace(logp, old, mask, ent, 0.7, 0.5))
    a = adv[:, None]
    loss = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high))
    loss = np.where(a < 0, np.minimum(loss, -a * cfg.dual_clip), loss)
    assert float(num) / float(den) == pytest.approx(loss[mask].sum() / mask.sum(), rel=1e-5)
    # The ratios differ from 1, so the trace changes the loss value compared to token PPO.
    cfg.loss = "ppo"
    num_ppo, _, _ = objective.policy_loss(cfg, jnp.float32(0.0), logp, ent, adv, mask, old_logp=old)
    assert float(num_ppo) != pytest.approx(float(num), rel=1e-4)
