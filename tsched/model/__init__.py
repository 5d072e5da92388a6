"""Functional API over the Flax decoder: parameters are a plain pytree, every function is pure."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from tsched.model.decoder import Decoder, ModelConfig, Params
from tsched.model.hf import load_pretrained, save_pretrained

__all__ = ["ModelConfig", "Params", "config_from", "init_params", "logical_axes", "forward", "init_cache",
           "apply_cached", "positions_from_valid", "load_pretrained", "save_pretrained"]


def config_from(model_cfg, vocab_size: int) -> ModelConfig:
    """ModelConfig from the `config.model` section (a preset name wins over the dims)."""
    from tsched.model import presets

    if model_cfg.preset:
        return presets.get(model_cfg.preset, dtype=model_cfg.dtype, remat=model_cfg.remat)
    m = model_cfg
    return ModelConfig(vocab_size=vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                       n_kv_heads=m.n_kv_heads, head_dim=m.head_dim, ffn_dim=m.ffn_dim, rope_theta=m.rope_theta,
                       norm_eps=m.norm_eps, qk_norm=m.qk_norm, qkv_bias=m.qkv_bias,
                       tie_embeddings=m.tie_embeddings, dtype=m.dtype, remat=m.remat)


def _dummy(cfg: ModelConfig):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return tokens, tokens, jnp.ones((1, 1, 1), bool)


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Freshly initialised float32 parameters (plain arrays, logical-axis boxes removed)."""
    return nn.unbox(Decoder(cfg).init(rng, *_dummy(cfg))["params"])


def logical_axes(cfg: ModelConfig) -> Params:
    """A pytree of PartitionSpecs over logical axis names, same structure as the parameters."""
    abstract = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), *_dummy(cfg))["params"])
    return nn.get_partition_spec(abstract)


def positions_from_valid(valid: jax.Array) -> jax.Array:
    """Rotary positions [B, S] from token validity [B, S]: padding does not advance the position."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def forward(cfg: ModelConfig, params: Params, tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Logits [B, T, V] of a full causal pass over tokens [B, T]; `valid` [B, T] marks non-padding."""
    T = tokens.shape[1]
    if valid is None:
        valid = jnp.ones(tokens.shape, bool)
    mask = jnp.tril(jnp.ones((T, T), bool))[None] & valid[:, None, :]
    logits, _ = Decoder(cfg).apply({"params": params}, tokens, positions_from_valid(valid), mask)
    return logits


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
    """Empty KV cache {'k', 'v': [L, B, S, K, Dh]} in the compute dtype."""
    shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, cfg.compute_dtype), "v": jnp.zeros(shape, cfg.compute_dtype)}


def apply_cached(cfg: ModelConfig, params: Params, tokens, positions, mask, cache, write_index):
    """One cached step: tokens [B, T] written at slot `write_index`; returns (logits [B, T, V], cache)."""
    return Decoder(cfg).apply({"params": params}, tokens, positions, mask, cache, write_index)
