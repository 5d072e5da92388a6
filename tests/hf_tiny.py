"""Tiny Hugging Face checkpoints and math problem sets, built by the tests themselves (no hub access).

`checkpoint(kind, dir)`: a random Qwen3 or Llama model saved by transformers (config.json,
model.safetensors, generation_config.json declaring TWO end ids), with a byte-level BPE
`tokenizer.json` trained on the problems, a `tokenizer_config.json` with a chat template, as the
Hub's checkpoints ship them. `problems(n, seed)`: small addition problems with `\\boxed{}` solutions.
"""

import json
import os

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHAT_TEMPLATE = (
    "{{ bos_token if bos_token is defined else '' }}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}")


def problems(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, 10, 2))
        out.append({"problem": f"What is {a}+{b}?", "answer": str(a + b),
                    "solution": f"{a}+{b}={a + b}. The answer is \\boxed{{{a + b}}}."})
    return out


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def write_parquet(path, rows, rename=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rename = rename or {}
    pq.write_table(pa.Table.from_pylist([{rename.get(k, k): v for k, v in r.items()} for r in rows]), str(path))
    return str(path)


def tokenizer(out_dir, texts):
    """A byte-level BPE tokenizer.json (vocab ~320) with the chat special tokens; returns {token: id}."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tsched.data.templates import BOXED_INSTRUCTION

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts) + [BOXED_INSTRUCTION, "Q: A:"] * 4, trainer)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in SPECIALS}, tok.get_vocab_size()


def checkpoint(kind, out_dir, seed=0):
    """Writes a tiny random `kind` ('qwen3' or 'llama') checkpoint directory; returns it."""
    import torch
    import transformers

    os.makedirs(out_dir, exist_ok=True)
    texts = [t for p in problems(200, 99) for t in (p["problem"], p["solution"])]
    ids, vocab = tokenizer(out_dir, texts)
    eos, end, pad = ids["<|im_end|>"], ids["<|endoftext|>"], ids["<|endoftext|>"]
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=512, rms_norm_eps=1e-6,
                  tie_word_embeddings=kind == "qwen3", eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(seed)
    if kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, rope_theta=1e6))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_theta=10000.0,
                                                                       bos_token_id=ids["<|im_start|>"]))
    model.generation_config = transformers.GenerationConfig(eos_token_id=[eos, end], pad_token_id=pad)
    model.save_pretrained(out_dir, safe_serialization=True)
    meta = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "chat_template": CHAT_TEMPLATE, "model_max_length": 512}
    if kind == "llama":
        meta["bos_token"] = "<|im_start|>"
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return str(out_dir)
