"""Decoder: cached decoding equals the full pass, padding is invisible, GQA and RoPE behave."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsched import model
from tsched.model import decoder


def test_param_count_and_logical_axes(tiny_model_cfg, tiny_params):
    assert sum(x.size for x in jax.tree.leaves(tiny_params)) == tiny_model_cfg.num_params()
    specs = model.logical_axes(tiny_model_cfg)
    flat = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(flat) == len(jax.tree.leaves(tiny_params))
    assert all(len(s) >= 1 and all(a is not None for a in s) for s in flat)  # every axis named
    assert specs["layers"]["q"] == jax.sharding.PartitionSpec("layers", "embed", "heads", "head_dim")


@pytest.mark.parametrize("variant", [{}, {"qk_norm": True, "qkv_bias": True, "tie_embeddings": False},
                                     {"rope_scaling": (8.0, 1.0, 4.0, 16)}, {"dtype": "bfloat16"}])
def test_cached_decode_equals_full_forward(tiny_model_cfg, variant):
    cfg = dataclasses.replace(tiny_model_cfg, **variant)
    params = model.init_params(cfg, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (3, 10), 0, cfg.vocab_size)
    full = model.forward(cfg, params, tokens)
    cache = model.init_cache(cfg, 3, 10)
    slots = jnp.arange(10)
    outs = []
    for t in range(10):  # one token at a time through the cache
        mask = jnp.broadcast_to((slots <= t)[None, None, :], (3, 1, 10))
        logits, cache = model.apply_cached(cfg, params, tokens[:, t:t + 1], jnp.full((3, 1), t), mask, cache, t)
        outs.append(logits[:, 0])
    tol = 1e-4 if cfg.dtype == "float32" else 5e-2
    np.testing.assert_allclose(np.asarray(jnp.stack(outs, 1)), np.asarray(full), atol=tol, rtol=tol)


def test_left_padding_does_not_change_logits(tiny_model_cfg, tiny_params):
    tokens = jax.random.randint(jax.random.key(3), (1, 6), 4, tiny_model_cfg.vocab_size)
    padded = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), tokens], 1)
    valid = jnp.arange(10)[None] >= 4
    a = model.forward(tiny_model_cfg, tiny_params, tokens)
    b = model.forward(tiny_model_cfg, tiny_params, padded, valid)[:, 4:]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_causality(tiny_model_cfg, tiny_params):
    t1 = jax.random.randint(jax.random.key(4), (1, 8), 0, tiny_model_cfg.vocab_size)
    t2 = t1.at[0, 5:].set((t1[0, 5:] + 1) % tiny_model_cfg.vocab_size)
    a, b = (model.forward(tiny_model_cfg, tiny_params, t) for t in (t1, t2))
    np.testing.assert_allclose(np.asarray(a[:, :5]), np.asarray(b[:, :5]), atol=1e-6)
    assert not np.allclose(np.asarray(a[:, 5:]), np.asarray(b[:, 5:]))


def test_rope_is_relative():
    # Attention scores of rotated q, k depend only on the position difference.
    inv = decoder.rope_inv_freq(decoder.ModelConfig(vocab_size=1, d_model=8, n_layers=1, n_heads=1,
                                                    n_kv_heads=1, head_dim=8, ffn_dim=8))
    q, k = jax.random.normal(jax.random.key(5), (2, 1, 1, 1, 8))
    score = lambda pq, pk: float(jnp.sum(decoder.apply_rope(q, jnp.array([[pq]]), inv) *
                                         decoder.apply_rope(k, jnp.array([[pk]]), inv)))
    assert score(3, 1) == pytest.approx(score(10, 8), rel=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)


def test_remat_and_scan_give_same_gradients(tiny_model_cfg, tiny_params):
    tokens = jax.random.randint(jax.random.key(6), (2, 7), 0, tiny_model_cfg.vocab_size)
    loss = lambda cfg: jax.grad(lambda p: jnp.sum(model.forward(cfg, p, tokens) ** 2))(tiny_params)
    g1, g2 = loss(tiny_model_cfg), loss(dataclasses.replace(tiny_model_cfg, remat=True))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6), g1, g2)
