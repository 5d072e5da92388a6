"""Shared fixtures. Multi-device tests run in subprocesses (the device count is fixed at JAX start-up)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def tiny_model_cfg():
    from tsched.model import ModelConfig

    return ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64)


@pytest.fixture(scope="session")
def tiny_params(tiny_model_cfg):
    import jax
    from tsched import model

    return model.init_params(tiny_model_cfg, jax.random.key(0))
