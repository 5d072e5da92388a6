"""Hugging Face checkpoints (Llama, Qwen2, Qwen3) in and out: config.json + safetensors <-> tsched params.

Reads single-file or index-sharded safetensors as published on the Hub; RoPE settings are read from the
top level (`rope_theta`, `rope_scaling`, older files) or from `rope_parameters` (transformers 5).
Weights are transposed from torch's [out, in] to tsched's [in, (heads, head_dim) | out] layout and
stacked over layers. `save_pretrained` writes the same format back.
"""

from __future__ import annotations

import json
import os

import numpy as np

from tsched.model.decoder import ModelConfig

SUPPORTED = ("llama", "qwen2", "qwen3")


def config_from_hf(hf: dict, dtype: str = "float32") -> ModelConfig:
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(f"unsupported architecture model_type={kind!r} ({hf.get('architectures')}); "
                         f"supported: {list(SUPPORTED)}")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    rope_scaling = None
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        if scaling.get("rope_type", scaling.get("type")) != "llama3":
            raise ValueError(f"unsupported rope scaling {scaling!r}; supported: llama3")
        rope_scaling = (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                        float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
    heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, ffn_dim=hf["intermediate_size"],
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))), rope_scaling=rope_scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qk_norm=kind == "qwen3",
        qkv_bias=kind == "qwen2" or bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype=dtype)


def _read_tensors(path: str) -> dict:
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    out = {}
    for f in files:
        # framework="flax" reads bfloat16 too (numpy has no bfloat16)
        with safe_open(os.path.join(path, f), framework="flax") as st:
            for name in st.keys():
                out[name] = np.asarray(st.get_tensor(name), np.float32)
    return out


def _layer_map(cfg: ModelConfig):
    """(hf suffix, tsched path, torch->tsched transform, expected hf shape) for one layer."""
    D, H, K, Dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    proj = lambda n: (lambda w: w.T.reshape(D, n, Dh))
    rows = [
        ("input_layernorm.weight", ("attn_norm", "scale"), lambda w: w, (D,)),
        ("self_attn.q_proj.weight", ("q",), proj(H), (H * Dh, D)),
        ("self_attn.k_proj.weight", ("k",), proj(K), (K * Dh, D)),
        ("self_attn.v_proj.weight", ("v",), proj(K), (K * Dh, D)),
        ("self_attn.o_proj.weight", ("o",), lambda w: w.T.reshape(H, Dh, D), (D, H * Dh)),
        ("post_attention_layernorm.weight", ("mlp_norm", "scale"), lambda w: w, (D,)),
        ("mlp.gate_proj.weight", ("gate",), lambda w: w.T, (F, D)),
        ("mlp.up_proj.weight", ("up",), lambda w: w.T, (F, D)),
        ("mlp.down_proj.weight", ("down",), lambda w: w, (D, F)),
    ]
    if cfg.qkv_bias:
        rows += [(f"self_attn.{n}_proj.bias", (f"{n}_bias",), lambda w, c=c: w.reshape(c, Dh), (c * Dh,))
                 for n, c in (("q", H), ("k", K), ("v", K))]
    if cfg.qk_norm:
        rows += [(f"self_attn.{n}_norm.weight", (f"{n}_norm", "scale"), lambda w: w, (Dh,)) for n in ("q", "k")]
    return rows


def _take(tensors: dict, name: str, shape: tuple) -> np.ndarray:
    if name not in tensors:
        raise KeyError(f"checkpoint is missing tensor {name!r}")
    w = tensors[name]
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"tensor {name!r} has shape {tuple(w.shape)}, expected {tuple(shape)} from config.json")
    return w


def _set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def load_pretrained(path: str, dtype: str = "float32"):
    """HF-format directory -> (ModelConfig, params); params float32 (dtype is the compute dtype)."""
    cfg = config_from_hf(json.load(open(os.path.join(path, "config.json"))), dtype)
    t = _read_tensors(path)
    params: dict = {"embedding": _take(t, "model.embed_tokens.weight", (cfg.vocab_size, cfg.d_model)),
                    "final_norm": {"scale": _take(t, "model.norm.weight", (cfg.d_model,))}, "layers": {}}
    for suffix, dest, fn, shape in _layer_map(cfg):
        stacked = np.stack([fn(_take(t, f"model.layers.{i}.{suffix}", shape)) for i in range(cfg.n_layers)])
        _set(params["layers"], dest, stacked)
    if not cfg.tie_embeddings:
        params["lm_head"] = _take(t, "lm_head.weight", (cfg.vocab_size, cfg.d_model)).T
    return cfg, params


def save_pretrained(path: str, cfg: ModelConfig, params) -> None:
    """Writes config.json and model.safetensors (float32) that transformers and load_pretrained read."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    kind = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
    D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    hf = {"model_type": kind, "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                                 "qwen3": "Qwen3ForCausalLM"}[kind]],
          "vocab_size": cfg.vocab_size, "hidden_size": D, "num_hidden_layers": cfg.n_layers,
          "num_attention_heads": H, "num_key_value_heads": K, "head_dim": Dh, "intermediate_size": cfg.ffn_dim,
          "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
          "hidden_act": "silu", "max_position_embeddings": 4096, "torch_dtype": "float32"}
    if cfg.rope_scaling:
        f, lo, hi, orig = cfg.rope_scaling
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": f, "low_freq_factor": lo, "high_freq_factor": hi,
                              "original_max_position_embeddings": orig}
    if kind == "llama":
        hf["attention_bias"] = False
    inverse = {("q",): lambda w: w.reshape(D, -1).T, ("k",): lambda w: w.reshape(D, -1).T,
               ("v",): lambda w: w.reshape(D, -1).T, ("o",): lambda w: w.reshape(H * Dh, D).T,
               ("gate",): lambda w: w.T, ("up",): lambda w: w.T, ("down",): lambda w: w}
    out = {"model.embed_tokens.weight": np.asarray(params["embedding"], np.float32),
           "model.norm.weight": np.asarray(params["final_norm"]["scale"], np.float32)}
    for suffix, dest, _, _ in _layer_map(cfg):
        leaf = params["layers"]
        for d in dest:
            leaf = leaf[d]
        leaf = np.asarray(leaf, np.float32)
        fn = inverse.get(dest, lambda w: w.reshape(-1))
        for i in range(cfg.n_layers):
            out[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(fn(leaf[i]))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"], np.float32).T)
    save_file(out, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
