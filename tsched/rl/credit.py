"""Credit allocation criteria: which response tokens are optimized, and with how much advantage.

`allocate(strategy, r, advantages, response_mask, entropies, cfg) -> (loss_mask [N, T], token_adv [N, T])`
with r the schedule magnitude (`tsched.rl.schedules`). r = 0 gives plain GRPO for every strategy.
`response_mask` says which tokens are valid; the returned `loss_mask` says which are selected; the
loss normaliser (selected or valid tokens) is chosen in `tsched.rl.losses`, never here.

    uniform      every valid token, sequence advantage broadcast (GRPO)
    tp           trajectory percentile: response of L tokens, the first min(floor(r L), L - 1) are context
    forking      per response the ceil((1 - r) n) highest-entropy valid tokens (ties: earlier token first)
    entropy_adv  A' = A + r min(alpha sg(H), |A| / kappa) on every valid token (Cheng et al. 2506.14758)

The paper's fourth strategy, off-policy prefixes, acts on the prompt, not on credit: it is a prompt
transform of the rollout (`tsched.rollout`, `rl.prompt_transform=reference_prefix`), driven by the same r.

Counts use float32 products of r with lengths, as the jitted loss computes them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tsched.registry import make_registry

CRITERIA, register = make_registry()


def _lengths(mask):
    return jnp.sum(mask, axis=-1).astype(jnp.int32)


@register("uniform")
def uniform(r, adv, mask, entropies, cfg):
    return mask, adv[:, None] * mask


@register("tp")
def trajectory_percentile(r, adv, mask, entropies, cfg):
    L = _lengths(mask)
    cut = jnp.minimum(jnp.floor(r * L.astype(jnp.float32)).astype(jnp.int32), L - 1)
    selected = mask & (jnp.arange(mask.shape[1])[None, :] >= cut[:, None])
    return selected, adv[:, None] * selected


@register("forking")
def forking(r, adv, mask, entropies, cfg):
    n = _lengths(mask)
    keep = jnp.clip(jnp.ceil((1.0 - r) * n.astype(jnp.float32)).astype(jnp.int32), 0, n)
    # The keep-th highest entropy of the row is the threshold: tokens above it are selected, and of the
    # tokens equal to it the earliest ones fill the remaining places. One value sort, where ranking by
    # argsort of an argsort cost two key-value sorts.
    neg = jnp.where(mask, -entropies, jnp.inf)  # ascending order = highest entropy first, padding last
    threshold = jnp.take_along_axis(jnp.sort(neg, axis=-1), jnp.maximum(keep - 1, 0)[:, None], axis=-1)
    above = neg < threshold
    ties = mask & (neg == threshold)
    room = keep[:, None] - jnp.sum(above, axis=-1, keepdims=True)
    selected = mask & (keep[:, None] > 0) & (above | (ties & (jnp.cumsum(ties, axis=-1) <= room)))
    return selected, adv[:, None] * selected


@register("entropy_adv")
def entropy_adv(r, adv, mask, entropies, cfg):
    bonus = jnp.minimum(cfg.alpha * jax.lax.stop_gradient(entropies), jnp.abs(adv)[:, None] / cfg.kappa)
    return mask, (adv[:, None] + r * bonus) * mask


def allocate(strategy: str, r, advantages, response_mask, entropies, cfg):
    """advantages [N], response_mask [N, T] bool, entropies [N, T] -> (loss_mask [N, T] bool, token_adv [N, T])."""
    response_mask = response_mask.astype(bool)
    return CRITERIA[strategy](r, advantages, response_mask, entropies, cfg)
