"""Functional API over the Flax decoder: parameters are a plain pytree, every function is pure."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from tsched.model import decoder
from tsched.model.decoder import Decoder, ModelConfig, Params, apply_unrolled, unembed, unstack_layers
from tsched.model.hf import load_pretrained, save_pretrained
from tsched.model.logits import token_stats

__all__ = ["ModelConfig", "Params", "config_from", "pretrained", "init_params", "logical_axes", "forward",
           "hidden_states", "prompt_kv", "unembed", "token_stats", "init_cache", "apply_unrolled", "unstack_layers",
           "positions_from_valid", "load_pretrained", "save_pretrained"]


def config_from(model_cfg, vocab_size: int) -> ModelConfig:
    """ModelConfig from the `config.model` section (a preset name wins over the dims)."""
    from tsched.model import presets

    if model_cfg.preset:
        return presets.get(model_cfg.preset, dtype=model_cfg.dtype, remat=model_cfg.remat,
                           scan_layers=model_cfg.scan_layers, logits_chunk=model_cfg.logits_chunk,
                           attn_block=model_cfg.attn_block)
    m = model_cfg
    return ModelConfig(vocab_size=vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                       n_kv_heads=m.n_kv_heads, head_dim=m.head_dim, ffn_dim=m.ffn_dim, rope_theta=m.rope_theta,
                       norm_eps=m.norm_eps, qk_norm=m.qk_norm, qkv_bias=m.qkv_bias,
                       tie_embeddings=m.tie_embeddings, dtype=m.dtype, remat=m.remat,
                       scan_layers=m.scan_layers, logits_chunk=m.logits_chunk, attn_block=m.attn_block)


def pretrained(model_cfg, weights: bool = True) -> tuple[ModelConfig, Params | None]:
    """(ModelConfig, float32 params) of the Hugging Face checkpoint `model.init_from`, with the compute
    settings (dtype, remat, scan_layers) of the `config.model` section; params None without `weights`."""
    import dataclasses
    import json
    import os

    from tsched.model.hf import config_from_hf

    m = model_cfg
    if weights:
        cfg, params = load_pretrained(m.init_from, m.dtype)
    else:
        cfg, params = config_from_hf(json.load(open(os.path.join(m.init_from, "config.json"))), m.dtype), None
    return dataclasses.replace(cfg, remat=m.remat, scan_layers=m.scan_layers), params


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
    return unembed(cfg, params, hidden_states(cfg, params, tokens, valid))


def hidden_states(cfg: ModelConfig, params: Params, tokens: jax.Array, valid: jax.Array | None = None,
                  prompt=None, segments: jax.Array | None = None) -> jax.Array:
    """Final-normed hidden states [B, T, D] float32 of a full causal pass, before the output projection
    (`token_stats` takes them to log-probs without the whole logits array).

    prompt: None, or (keys and values from `prompt_kv`, their validity [Bp, P], rows [B] the prompt of each
    row): the rows continue their prompts, attending over the prompt's valid tokens and then causally
    over their own, at positions that go on from the prompt's (equal, on valid tokens, to one pass over
    the prompt and the row joined, but each prompt's tokens run once for all its rows).
    segments: None, or [B, T] ints packing several sequences into a row after a shared prefix: tokens of
    segment 0 are the prefix (a prompt's, seen by every later token), each segment s > 0 attends causally
    over the prefix (and `prompt`) and itself only, its positions going on from the prefix's as if it
    were the only continuation. Without it a row is one sequence.
    """
    T = tokens.shape[1]
    if valid is None:
        valid = jnp.ones(tokens.shape, bool)
    mask = jnp.tril(jnp.ones((T, T), bool))[None] & valid[:, None, :]
    positions = positions_from_valid(valid)
    if segments is not None:
        mask &= (segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == 0)
        ones = valid.astype(jnp.int32)
        counted = jnp.cumsum(ones, axis=-1)
        starts = segments != jnp.pad(segments[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
        before = jax.lax.cummax(jnp.where(starts, counted - ones, 0), axis=1)  # valid tokens before the segment
        prefix = jnp.sum(valid & (segments == 0), -1, dtype=jnp.int32)[:, None]
        positions = jnp.where(segments == 0, positions, prefix + jnp.maximum(counted - before - 1, 0))
    if prompt is not None:
        kv, prompt_valid, rows = prompt
        prompt_valid = prompt_valid[rows]
        mask = jnp.concatenate([jnp.broadcast_to(prompt_valid[:, None, :], (*tokens.shape, prompt_valid.shape[1])),
                                mask], axis=-1)
        positions = positions + jnp.sum(prompt_valid, -1, dtype=jnp.int32)[:, None]
        prompt = (kv, rows)
    return decoder.full_pass(cfg, params, tokens, positions, mask, prompt)[0]


def prompt_kv(cfg: ModelConfig, params: Params, tokens: jax.Array, valid: jax.Array) -> dict:
    """tokens, valid [B, P] -> the keys and values of every layer over them, {'k': [L, B, K, Dh, P],
    'v': [L, B, K, P, Dh]} float32: the prompt part of `hidden_states(..., prompt=...)`."""
    P = tokens.shape[1]
    mask = jnp.tril(jnp.ones((P, P), bool))[None] & valid[:, None, :]
    return decoder.full_pass(cfg, params, tokens, positions_from_valid(valid), mask)[1]


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> tuple:
    """Empty KV cache holding `dtype` values (default the compute dtype): per layer {'k': [B, K, Dh, S],
    'v': [B, K, S, Dh]} (stored as `decoder.cache_dtype`)."""
    k, v = (batch, cfg.n_kv_heads, cfg.head_dim, length), (batch, cfg.n_kv_heads, length, cfg.head_dim)
    dt = decoder.cache_dtype(cfg.compute_dtype if dtype is None else dtype)
    return tuple({"k": jnp.zeros(k, dt), "v": jnp.zeros(v, dt)}
                 for _ in range(cfg.n_layers))
