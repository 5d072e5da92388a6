"""Schedule magnitude r(step): how far the credit criterion is from plain full-trajectory GRPO.

r goes from `initial_magnitude` (m) at `s0 = int(T * min_ratio)` to 0 at `s1 = int(T * max_ratio)`, with
T = `total_steps` and progress `p = clip((step - s0) / (s1 - s0), 0, 1)`; the step counter starts at 1.
Profiles, each a registered pure function of p (formulas of the reference implementation):

    linear   r = m (1 - p)
    sigmoid  r = m (σ(p) - σ(1)) / (σ(0) - σ(1)),  σ(p) = 1 / (1 + exp(k (p - 1/2)))
    gamma    r = (m (1 - p)) ** γ            (m is raised to γ as well, as in the reference)
    cosine   r = m (1 + cos(π p)) / 2
    rex      r = m (1 - p) / (1/2 + (1 - p) / 2)   (REX, Chen et al. 2021)
    constant r = m                            (a static criterion, e.g. the 80/20 forking baseline)

`magnitude` works on a traced `step`, so the jitted train step compiles once for all steps.
"""

from __future__ import annotations

import jax.numpy as jnp

from tsched.registry import make_registry

PROFILES, register = make_registry()


@register("linear")
def linear(p, m, cfg):
    return m * (1.0 - p)


@register("sigmoid")
def sigmoid(p, m, cfg):
    s = lambda x: 1.0 / (1.0 + jnp.exp(cfg.sigmoid_k * (x - 0.5)))
    return m * (s(p) - s(1.0)) / (s(0.0) - s(1.0))


@register("gamma")
def gamma(p, m, cfg):
    return (m * (1.0 - p)) ** cfg.gamma


@register("cosine")
def cosine(p, m, cfg):
    return m * 0.5 * (1.0 + jnp.cos(jnp.pi * p))


@register("rex")
def rex(p, m, cfg):
    return m * (1.0 - p) / (0.5 + 0.5 * (1.0 - p))


@register("constant")
def constant(p, m, cfg):
    return m + 0.0 * p


def boundaries(cfg) -> tuple[int, int]:
    """(s0, s1): the steps where the decay starts and ends."""
    return int(cfg.total_steps * cfg.min_ratio), int(cfg.total_steps * cfg.max_ratio)


def progress(step, cfg) -> jnp.ndarray:
    s0, s1 = boundaries(cfg)
    return jnp.clip((jnp.asarray(step, jnp.float32) - s0) / max(s1 - s0, 1), 0.0, 1.0)


def magnitude(step, cfg) -> jnp.ndarray:
    """float32 scalar r(step) for the schedule section `cfg` (mode, initial_magnitude, ratios, ...)."""
    p = progress(step, cfg)
    return jnp.asarray(PROFILES[cfg.mode](p, jnp.float32(cfg.initial_magnitude), cfg), jnp.float32)
