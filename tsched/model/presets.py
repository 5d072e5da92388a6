"""Dimensions of published checkpoints (dims only: weights come from `load_pretrained`)."""

from __future__ import annotations

import dataclasses

from tsched.model.decoder import ModelConfig

_QWEN3 = dict(vocab_size=151936, head_dim=128, rope_theta=1e6, norm_eps=1e-6, qk_norm=True)
PRESETS: dict[str, ModelConfig] = {
    "qwen3-0.6b": ModelConfig(d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8, ffn_dim=3072, **_QWEN3),
    "qwen3-1.7b": ModelConfig(d_model=2048, n_layers=28, n_heads=16, n_kv_heads=8, ffn_dim=6144, **_QWEN3),
    "qwen3-4b": ModelConfig(d_model=2560, n_layers=36, n_heads=32, n_kv_heads=8, ffn_dim=9728, **_QWEN3),
    "qwen3-8b": ModelConfig(d_model=4096, n_layers=36, n_heads=32, n_kv_heads=8, ffn_dim=12288,
                            tie_embeddings=False, **_QWEN3),
    "llama-3.2-1b": ModelConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                                head_dim=64, ffn_dim=8192, rope_theta=500000.0,
                                rope_scaling=(32.0, 1.0, 4.0, 8192), norm_eps=1e-5),
}


def get(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"config field 'model.preset' = {name!r} is not one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
