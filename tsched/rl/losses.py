"""Policy-gradient token losses (PPO-clip, GSPO), KL estimators, and loss aggregation modes.

All functions take [N, T] arrays. Aggregation returns (numerator, denominator) with a denominator that
does not depend on the parameters, so gradient accumulation over micro-batches is exact: accumulate
gradients of numerators and the denominators, divide once (peers that normalised per micro-batch
silently re-weighted tokens, verl #5625).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tsched.registry import make_registry

LOG_RATIO_CLAMP = 20.0
LOG_RATIOS, register_log_ratio = make_registry()
KL_ESTIMATORS, register_kl = make_registry()
AGGREGATIONS, register_aggregation = make_registry()


def clipped_objective(log_ratio, adv, clip_low: float, clip_high: float, dual_clip: float):
    """PPO clip with asymmetric range [1 - clip_low, 1 + clip_high] and dual clip for A < 0.

    L = max(-A r, -A clip(r)); for A < 0, L = min(L, -A dual_clip) (dual_clip = 0: off).
    Returns (loss [N, T], clipped [N, T] bool: the clipped branch is the active one).
    """
    ratio = jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(unclipped, clipped)
    if dual_clip:
        loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * dual_clip), loss)
    return loss, clipped > unclipped


@register_log_ratio("ppo")
def ppo_log_ratio(logp, old_logp, mask):
    return logp - old_logp


@register_log_ratio("gspo")
def gspo_log_ratio(logp, old_logp, mask):
    """GSPO token form: value log s_i = mean_t(logp - old) over the row, gradient of each token's logp."""
    m = mask.astype(jnp.float32)
    log_s = jnp.sum((logp - old_logp) * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0)
    # The value of every token's ratio is the sequence ratio s_i; the gradient flows through its own logp.
    return logp - jax.lax.stop_gradient(logp) + jax.lax.stop_gradient(log_s)[:, None]


@register_kl("k1")
def kl_k1(logp, ref_logp):
    """logp - ref: unbiased, can be negative per token."""
    return logp - ref_logp


@register_kl("k3")
def kl_k3(logp, ref_logp):
    """exp(ref - logp) - (ref - logp) - 1: unbiased and non-negative (Schulman's k3)."""
    d = ref_logp - logp
    return jnp.exp(jnp.clip(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) - d - 1.0


def kl(logp, ref_logp, estimator: str):
    """Per-token KL(pi || pi_ref) estimate [N, T] by the named estimator."""
    return KL_ESTIMATORS[estimator](logp, ref_logp)


@register_aggregation("token-mean")
def token_mean(seq_sum, n_tokens, horizon):
    """sum(l) / #norm tokens"""
    return jnp.sum(seq_sum), jnp.sum(n_tokens)


@register_aggregation("seq-mean-token-sum")
def seq_mean_token_sum(seq_sum, n_tokens, horizon):
    """sum_i sum_t(l) / #seqs"""
    return jnp.sum(seq_sum), _n_seqs(n_tokens)


@register_aggregation("seq-mean-token-mean")
def seq_mean_token_mean(seq_sum, n_tokens, horizon):
    """sum_i [sum_t(l) / #norm tokens_i] / #seqs"""
    return jnp.sum(seq_sum / jnp.maximum(n_tokens, 1.0)), _n_seqs(n_tokens)


@register_aggregation("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(seq_sum, n_tokens, horizon):
    """sum_i sum_t(l) / (#seqs * T), T the padded horizon (Dr. GRPO's constant normaliser)"""
    return jnp.sum(seq_sum), _n_seqs(n_tokens) * horizon


def _n_seqs(n_tokens):
    """A sequence counts in seq-mean modes if it has a token to normalise by."""
    return jnp.sum(n_tokens > 0).astype(jnp.float32)


def aggregate(loss, loss_mask, norm_mask, mode: str):
    """(numerator, denominator) of the aggregated loss [N, T] -> scalars; loss = numerator / denominator.

    loss_mask selects the tokens whose loss counts; norm_mask the tokens a mean divides by (the selected
    tokens, or all valid tokens). Modes are the registered `AGGREGATIONS`.
    """
    lm, nm = loss_mask.astype(jnp.float32), norm_mask.astype(jnp.float32)
    return AGGREGATIONS[mode](jnp.sum(loss * lm, -1), jnp.sum(nm, -1), loss.shape[-1])
