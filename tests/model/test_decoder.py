"""Decoder: cached decoding equals the full pass, padding is invisible, GQA and RoPE behave."""

import dataclasses
import functools

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


@pytest.mark.parametrize("sampler_form", [False, True], ids=["plain", "fused_qkv_rope_table"])
@pytest.mark.parametrize("variant", [{}, {"qk_norm": True, "qkv_bias": True, "tie_embeddings": False},
                                     {"rope_scaling": (8.0, 1.0, 4.0, 16)}, {"dtype": "bfloat16"}])
def test_cached_decode_equals_full_forward(tiny_model_cfg, variant, sampler_form):
    # sampler_form: the weights and rotary angles as the sampler passes them (q, k, v joined into one
    # matmul, angles looked up in a table).
    cfg = dataclasses.replace(tiny_model_cfg, **variant)
    params = model.init_params(cfg, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (3, 10), 0, cfg.vocab_size)
    full = model.forward(cfg, params, tokens)
    cache, layers = model.init_cache(cfg, 3, 10), model.unstack_layers(params, fuse_qkv=sampler_form)
    assert ("qkv" in layers["layers"][0]) == sampler_form and ("q" in layers["layers"][0]) != sampler_form
    table = decoder.rope_table(cfg, 10) if sampler_form else None
    slots = jnp.arange(10)
    outs = []
    step = jax.jit(functools.partial(model.apply_unrolled, cfg))  # the slot t traced: one compilation
    for t in range(10):  # one token at a time through the cache
        mask = jnp.broadcast_to((slots <= t)[None, None, :], (3, 1, 10))
        logits, cache = step(layers, tokens[:, t:t + 1], jnp.full((3, 1), t), mask, cache, jnp.int32(t),
                             angle_table=table)
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


def test_packed_segments_equal_separate_passes(tiny_model_cfg, tiny_params):
    """hidden_states with segments: a left-padded shared prefix (segment 0) and three sequences packed
    after it, then unused columns, give on every sequence token the states of that sequence alone
    after the prefix (its own positions, nothing of the other sequences)."""
    cfg, V = tiny_model_cfg, tiny_model_cfg.vocab_size
    prefix = jnp.asarray([0, 0, 7, 8, 9])  # two padding slots, 3 tokens
    seqs = [jax.random.randint(jax.random.key(i), (n,), 4, V) for i, n in enumerate((3, 1, 4))]
    tokens = jnp.concatenate([prefix, *seqs, jnp.zeros(2, jnp.int32)])[None]
    segments = jnp.asarray([0] * 5 + [1] * 3 + [2] + [3] * 4 + [0] * 2)[None]
    valid = jnp.asarray([False] * 2 + [True] * 11 + [False] * 2)[None]
    packed = model.hidden_states(cfg, tiny_params, tokens, valid, segments=segments)[0]
    at = 5
    for s in seqs:
        alone = model.hidden_states(cfg, tiny_params, jnp.concatenate([prefix[2:], s])[None])[0, 3:]
        np.testing.assert_allclose(np.asarray(packed[at:at + len(s)]), np.asarray(alone), atol=2e-5, rtol=2e-5)
        at += len(s)
    alone = model.hidden_states(cfg, tiny_params, prefix[2:][None])[0]
    np.testing.assert_allclose(np.asarray(packed[2:5]), np.asarray(alone), atol=2e-5, rtol=2e-5)


def test_causality(tiny_model_cfg, tiny_params):
    t1 = jax.random.randint(jax.random.key(4), (1, 8), 0, tiny_model_cfg.vocab_size)
    t2 = t1.at[0, 5:].set((t1[0, 5:] + 1) % tiny_model_cfg.vocab_size)
    a, b = (model.forward(tiny_model_cfg, tiny_params, t) for t in (t1, t2))
    np.testing.assert_allclose(np.asarray(a[:, :5]), np.asarray(b[:, :5]), atol=1e-6)
    assert not np.allclose(np.asarray(a[:, 5:]), np.asarray(b[:, 5:]))


def test_rope_is_relative():
    # Attention scores of rotated q, k depend only on the position difference.
    cfg = decoder.ModelConfig(vocab_size=1, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, ffn_dim=8)
    q, k = jax.random.normal(jax.random.key(5), (2, 1, 1, 1, 8))
    table = decoder.rope_table(cfg, 16)
    score = lambda pq, pk, t=None: float(jnp.sum(decoder.apply_rope(q, *decoder.rope(cfg, jnp.array([[pq]]), t)) *
                                                 decoder.apply_rope(k, *decoder.rope(cfg, jnp.array([[pk]]), t))))
    assert score(3, 1) == pytest.approx(score(10, 8), rel=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)
    assert score(3, 1, table) == pytest.approx(score(3, 1), rel=1e-6)  # the decode's lookup


@pytest.mark.parametrize("variant", [{"remat": True}, {"scan_layers": False}, {"scan_layers": False, "remat": True}])
def test_remat_and_unrolled_layers_match_scan(tiny_model_cfg, tiny_params, variant):
    tokens = jax.random.randint(jax.random.key(6), (2, 7), 0, tiny_model_cfg.vocab_size)
    loss = lambda cfg: jax.value_and_grad(lambda p: jnp.sum(model.forward(cfg, p, tokens) ** 2))(tiny_params)
    base = dataclasses.replace(tiny_model_cfg, scan_layers=True, remat=False)
    (l1, g1), (l2, g2) = loss(base), loss(dataclasses.replace(base, **variant))
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5), g1, g2)


@pytest.mark.parametrize("eq,shapes", [("btd,df->btf", ((2, 3, 4), (4, 6))), ("btf,df->btd", ((2, 3, 6), (4, 6))),
                                       ("btd,dhk->bthk", ((2, 3, 4), (4, 2, 5))),
                                       ("bkqm,bkmn->bkqn", ((2, 2, 12, 5), (2, 2, 5, 3)))])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mm_gradient_rule_matches_autodiff_of_einsum(eq, shapes, dtype):
    a, b = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate(shapes))
    w = jax.random.normal(jax.random.key(9), jnp.einsum(eq, a, b).shape)
    dt = jnp.dtype(dtype)
    ref = lambda a, b: jnp.sum(w * jnp.einsum(eq, a.astype(dt), b.astype(dt), preferred_element_type=jnp.float32))
    ours = lambda a, b: jnp.sum(w * decoder.mm(eq, a, b, dt))
    tol = 1e-5 if dtype == "float32" else 2e-2
    for x, y in zip(jax.grad(ref, (0, 1))(a, b), jax.grad(ours, (0, 1))(a, b)):
        assert x.dtype == y.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def test_decode_matvec_attention_equals_matmul():
    # bmm switches to a multiply-reduce for a few query rows; both forms are the same product.
    a, b = jax.random.normal(jax.random.key(0), (3, 2, 4, 16)), jax.random.normal(jax.random.key(1), (3, 2, 16, 7))
    want = jnp.einsum("bkqm,bkmn->bkqn", a, b)
    np.testing.assert_allclose(np.asarray(decoder.bmm(a, b, jnp.float32)), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_gradient_rule_matches_autodiff(dtype):
    # Causal mask with left padding: row 0's first queries see no key at all (a fully masked row).
    B, K, G, T, Dh = 2, 2, 3, 5, 4
    q, k, v, w = (jax.random.normal(jax.random.key(i), s) for i, s in
                  enumerate([(B, K, G * T, Dh), (B, K, Dh, T), (B, K, T, Dh), (B, K, G * T, Dh)]))
    slots = jnp.arange(T)
    mask = (slots[None, :, None] >= slots[None, None, :]) & (slots[None, None, :] >= jnp.array([2, 0])[:, None, None])
    mask = mask & (slots[None, :, None] >= jnp.array([2, 0])[:, None, None])
    dt = jnp.dtype(dtype)

    def ref(q, k, v):
        s = jnp.einsum("bkqd,bkds->bkqs", q.astype(dt), k.astype(dt), preferred_element_type=jnp.float32)
        s = jnp.where(mask[:, None, None], s.reshape(B, K, G, T, T) / np.sqrt(Dh), decoder.NEG_INF)
        p = jax.nn.softmax(s, -1).reshape(B, K, G * T, T)
        o = jnp.einsum("bkqs,bksd->bkqd", p.astype(dt), v.astype(dt), preferred_element_type=jnp.float32)
        return jnp.sum(w * o)

    ours = lambda q, k, v: jnp.sum(w * decoder.attention(q, k, v, mask, dt))
    tol = 1e-5 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(float(ours(q, k, v)), float(ref(q, k, v)), rtol=tol)
    for x, y in zip(jax.grad(ref, (0, 1, 2))(q, k, v), jax.grad(ours, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=tol, atol=tol)
