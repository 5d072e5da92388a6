"""Policy-gradient token losses (PPO-clip, GSPO), KL estimators, and loss aggregation modes.

All functions take [N, T] arrays. Aggregation returns (numerator, denominator) with a denominator that
does not depend on the parameters, so gradient accumulation over micro-batches is exact: accumulate
gradients of numerators and the denominators, divide once (peers that normalised per micro-batch
silently re-weighted tokens, verl #5625).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOG_RATIO_CLAMP = 20.0


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


def ppo_log_ratio(logp, old_logp, mask):
    return logp - old_logp


def gspo_log_ratio(logp, old_logp, mask):
    """GSPO token form: value log s_i = mean_t(logp - old) over the row, gradient of each token's logp."""
    m = mask.astype(jnp.float32)
    log_s = jnp.sum((logp - old_logp) * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0)
    # The value of every token's ratio is the sequence ratio s_i; the gradient flows through its own logp.
    return logp - jax.lax.stop_gradient(logp) + jax.lax.stop_gradient(log_s)[:, None]


LOG_RATIOS = {"ppo": ppo_log_ratio, "gspo": gspo_log_ratio}


def kl(logp, ref_logp, estimator: str):
    """Per-token KL(pi || pi_ref) estimate: k1 = logp - ref; k3 = exp(ref - logp) - (ref - logp) - 1."""
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    return jnp.exp(jnp.clip(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) - d - 1.0


def aggregate(loss, loss_mask, norm_mask, mode: str):
    """(numerator, denominator) of the aggregated loss; loss = numerator / denominator.

    loss_mask selects the tokens whose loss counts; norm_mask the tokens a mean divides by (the selected
    tokens, or all valid tokens). A sequence counts in seq-mean modes if it has a norm_mask token.
        token-mean               sum(l) / #norm tokens
        seq-mean-token-sum       sum_i sum_t(l) / #seqs
        seq-mean-token-mean      sum_i [sum_t(l) / #norm tokens_i] / #seqs
        seq-mean-token-sum-norm  sum_i sum_t(l) / (#seqs * T)   (T = padded horizon)
    """
    lm, nm = loss_mask.astype(jnp.float32), norm_mask.astype(jnp.float32)
    seq_sum = jnp.sum(loss * lm, -1)
    n_tokens = jnp.sum(nm, -1)
    n_seqs = jnp.sum(n_tokens > 0).astype(jnp.float32)
    if mode == "token-mean":
        return jnp.sum(seq_sum), jnp.sum(n_tokens)
    if mode == "seq-mean-token-sum":
        return jnp.sum(seq_sum), n_seqs
    if mode == "seq-mean-token-mean":
        return jnp.sum(seq_sum / jnp.maximum(n_tokens, 1.0)), n_seqs
    if mode == "seq-mean-token-sum-norm":
        return jnp.sum(seq_sum), n_seqs * loss.shape[-1]
    raise ValueError(f"unknown aggregation mode {mode!r}")
