"""Parity with Hugging Face transformers: tiny random Llama / Qwen2 / Qwen3 models, saved as safetensors,
loaded by tsched; logits within 1e-4 (float32) and identical greedy decoding for 32 steps."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # from requirements-test.txt
import transformers

from tsched import model
from tsched.sampling.sampler import SamplingConfig, sample

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
CASES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, head_dim=16, rope_theta=500000.0, tie_word_embeddings=True,
                                              rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 32}),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, rope_theta=10000.0, tie_word_embeddings=False),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=24, rope_theta=1e6, tie_word_embeddings=True),
}
MODELS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


# Qwen3 in the fast set; Llama (llama3 RoPE scaling) and Qwen2 (q/k/v biases) in the full suite.
@pytest.fixture(scope="module",
                params=["qwen3", *(pytest.param(k, marks=pytest.mark.slow) for k in ("llama", "qwen2"))])
def hf_model(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = CASES[request.param]()
    m = getattr(transformers, MODELS[request.param])(cfg).eval()
    with torch.no_grad():  # random norms and biases too, so they are really exercised
        for name, p in m.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp(request.param)
    m.save_pretrained(path, safe_serialization=True)
    return request.param, m, str(path)


def test_logits_match(hf_model):
    kind, m, path = hf_model
    cfg, params = model.load_pretrained(path)
    assert cfg.qk_norm == (kind == "qwen3") and cfg.qkv_bias == (kind == "qwen2")
    tokens = np.random.default_rng(0).integers(0, 96, (2, 40))
    with torch.no_grad():
        want = m(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(model.forward(cfg, jax.tree.map(jnp.asarray, params), jnp.asarray(tokens)))
    assert np.max(np.abs(got - want)) <= 1e-4


def test_greedy_decoding_matches(hf_model):
    kind, m, path = hf_model
    cfg, params = model.load_pretrained(path)
    prompt = np.random.default_rng(1).integers(0, 96, (1, 8))
    with torch.no_grad():
        want = m.generate(torch.tensor(prompt), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                          pad_token_id=0, eos_token_id=None)[0, 8:].numpy()
    scfg = SamplingConfig(max_new_tokens=32, eos_id=-1, pad_id=0, temperature=0.0)
    got = sample(cfg, scfg, jax.tree.map(jnp.asarray, params), jnp.asarray(prompt, jnp.int32),
                 jnp.asarray([8], jnp.int32), jax.random.key(0))["tokens"][0]
    np.testing.assert_array_equal(np.asarray(got), want)


def test_round_trip_is_exact(hf_model, tmp_path):
    _, _, path = hf_model
    cfg, params = model.load_pretrained(path)
    model.save_pretrained(str(tmp_path), cfg, params)
    cfg2, params2 = model.load_pretrained(str(tmp_path))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_clear_errors(hf_model, tmp_path):
    _, _, path = hf_model
    hf = json.load(open(f"{path}/config.json"))
    (tmp_path / "config.json").write_text(json.dumps({**hf, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        model.load_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**hf, "intermediate_size": 100}))
    import shutil
    shutil.copy(f"{path}/model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="mlp.gate_proj.weight"):
        model.load_pretrained(str(tmp_path))


def test_index_sharded_checkpoint_loads_the_same(hf_model, tmp_path):
    kind, m, path = hf_model
    m.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    _, a = model.load_pretrained(path)
    _, b = model.load_pretrained(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, a, b)
