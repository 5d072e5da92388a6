"""A policy as a Hugging Face checkpoint directory (`train.export_hf=True` writes `<run_dir>/hf`).

    config.json + model.safetensors    tsched.model.save_pretrained (float32), plus eos / pad ids
    tokenizer files                    copied from the tokenizer's directory (tokenizer.json,
                                       tokenizer_config.json, chat template, ...)
    generation_config.json             the checkpoint's own (if any) with `eos_token_id` = every stop id

transformers loads the directory (`AutoModelForCausalLM`, `AutoTokenizer`) with the same logits.

A sentencepiece tokenizer trained by tsched has no `tokenizer.json`: its `.model` is copied as
`tokenizer.model` with a `tokenizer_config.json` naming its special tokens. That is as far as the
format goes: transformers has no tokenizer class that reproduces tsched's unigram model with
`split_digits` and the identity normaliser exactly, so load it with `sentencepiece` (or
`tsched.data.tokenizer.load`) rather than `AutoTokenizer`.
"""

from __future__ import annotations

import json
import os
import shutil

from tsched import model as model_lib

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "vocab.json", "merges.txt")


def export_hf(out_dir: str, model_cfg, params, tok, init_from: str = "") -> str:
    """Writes the HF directory `out_dir` for `params` and tokenizer `tok`; returns `out_dir`.

    With `init_from` (the checkpoint the run started from), its config.json entries that tsched does
    not write (max_position_embeddings, bos_token_id, ...) are kept; the weights' dtype is float32."""
    import jax
    import numpy as np

    model_lib.save_pretrained(out_dir, model_cfg, jax.tree.map(np.asarray, jax.device_get(params)))
    src = os.path.dirname(os.path.abspath(tok.path))
    stops = list(tok.stop_ids)
    if tok.path.endswith(".json"):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), os.path.join(out_dir, name))
        if os.path.isdir(os.path.join(src, "chat_templates")):
            shutil.copytree(os.path.join(src, "chat_templates"), os.path.join(out_dir, "chat_templates"),
                            dirs_exist_ok=True)
    else:
        shutil.copy(tok.path, os.path.join(out_dir, "tokenizer.model"))
        piece = tok.sp.id_to_piece
        meta = {"tokenizer_class": "LlamaTokenizer", "eos_token": piece(tok.eos_id), "pad_token": piece(tok.pad_id),
                "unk_token": piece(tok.sp.unk_id()), "add_bos_token": False, "add_eos_token": False,
                "legacy": False, "tsched_note": "sentencepiece unigram with split_digits and the identity "
                "normaliser; load tokenizer.model with sentencepiece for exact tokenization"}
        if tok.sp.bos_id() >= 0:
            meta["bos_token"] = piece(tok.sp.bos_id())
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(meta, f, indent=2)
    gen_src = os.path.join(src, "generation_config.json")
    gen = json.load(open(gen_src)) if os.path.isfile(gen_src) else {}
    gen.update(eos_token_id=stops if len(stops) > 1 else stops[0], pad_token_id=tok.pad_id)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    config_path = os.path.join(out_dir, "config.json")
    hf = json.load(open(config_path))
    base_path = os.path.join(init_from, "config.json") if init_from else ""
    if base_path and os.path.isfile(base_path):
        base = json.load(open(base_path))
        if "max_position_embeddings" in base:  # tsched writes a placeholder
            hf.pop("max_position_embeddings")
        hf = {**base, **hf}
        hf.pop("rope_parameters", None) if "rope_scaling" in hf or "rope_theta" in hf else None
        if "dtype" in hf:
            hf["dtype"] = "float32"
    hf.update(eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    with open(config_path, "w") as f:
        json.dump(hf, f, indent=2)
    return out_dir
