"""Group advantage estimators over the G samples of each prompt, registered by name.

rewards [N] with N = B * G, rows b*G .. b*G+G-1 from prompt b. Returns advantages [N], one per response,
broadcast to its tokens by `tsched.rl.credit`.

    grpo    (s_i - mean_g) / (std_g + eps), std unbiased (ddof = 1)
    drgrpo  s_i - mean_g                    (Dr. GRPO: no std division)
    rloo    s_i - mean_{j != i} s_j = G / (G - 1) (s_i - mean_g)
"""

from __future__ import annotations

import jax.numpy as jnp

from tsched.registry import make_registry

EPS = 1e-6
ESTIMATORS, register = make_registry()


@register("grpo")
def grpo(s):
    return (s - s.mean(-1, keepdims=True)) / (s.std(-1, ddof=1, keepdims=True) + EPS)


@register("drgrpo")
def drgrpo(s):
    return s - s.mean(-1, keepdims=True)


@register("rloo")
def rloo(s):
    G = s.shape[-1]
    return G / (G - 1) * (s - s.mean(-1, keepdims=True))


def compute(rewards, group_size: int, estimator: str):
    """-> (advantages [N], fraction of groups whose rewards all agree, which carry no signal)."""
    s = rewards.astype(jnp.float32).reshape(-1, group_size)
    zero_var = jnp.mean(jnp.all(s == s[:, :1], axis=-1))
    return ESTIMATORS[estimator](s).reshape(-1), zero_var
