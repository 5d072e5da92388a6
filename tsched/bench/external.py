"""The reference points of the RL step benchmark: Hugging Face `generate` and TRL's GRPO trainer (PyTorch, CPU).

    python -m tsched.bench.external [--steps 3] [--json PATH] [shape flags of tsched.bench]

Normally run by `python -m tsched.bench --external`, which starts it as its own process after tsched's
phases (so PyTorch's and XLA's thread pools never share the cores) and prints both side by side. Needs
requirements-test.txt (torch, transformers, trl).

The model is a Llama-architecture decoder of the bench's shape (`tsched.bench` flags: layers, d_model, ffn,
heads, kv heads, head_dim, vocab; tied embeddings, no qk-norm, no biases: the same parameters and FLOPs as
tsched's decoder), randomly initialised, float32. Prompts are `--prompts` random token sequences of
`--prompt-len` tokens, sampled `--samples` times each at temperature 1 (no top-k / top-p), every response
forced to `--new-tokens` tokens (`min_new_tokens`), as in tsched's forced-length bench.

    generate  `model.generate(..., num_return_sequences=G)`: HF's sampler with its KV cache
    grpo_step one optimizer step of `trl.GRPOTrainer` (generation, reward, the GRPO loss forward and
              backward in `--micro-batches` gradient-accumulation slices, AdamW), beta 0 (no reference
              model, as the bench), one update per generation batch (on-policy, no old-log-prob pass):
              tsched's `rl_step`
Each is the median over `--steps` timed calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import zlib


# The benchmark's reference shape: its flags in tsched.bench and here (`--d-model` for d_model, ...).
REFERENCE_SHAPE = {"layers": 4, "d_model": 256, "ffn": 1024, "heads": 4, "kv_heads": 2, "head_dim": 64, "vocab": 512,
                   "prompts": 8, "samples": 8, "prompt_len": 64, "new_tokens": 128, "micro_batches": 4}
HELP = {"micro_batches": "the update's gradient-accumulation slices (rl.micro_batches); one optimizer step"}


def shape_args(ap: argparse.ArgumentParser) -> None:
    """The shape flags, with REFERENCE_SHAPE's defaults."""
    for name, default in REFERENCE_SHAPE.items():
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=default, help=HELP.get(name))


def word(i: int) -> str:
    """Token i's text: three letters (with digits in the words, transformers' fast tokenizer split "t20" into
    "t2" + "0" here)."""
    return "".join(chr(97 + i // 26 ** k % 26) for k in (2, 1, 0))


def build(args):
    """(model, tokenizer, prompt texts [B]): a random Llama decoder and a word-level tokenizer of `vocab`
    tokens (0 pad, 1 unknown, 2 end of sequence), each prompt exactly `prompt_len` tokens."""
    import numpy as np
    import tokenizers
    import torch
    import transformers

    torch.manual_seed(0)
    words = {word(i): i for i in range(args.vocab)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token=word(1)))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=word(0), unk_token=word(1),
                                                     eos_token=word(2), padding_side="left")
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        tie_word_embeddings=True, max_position_embeddings=args.prompt_len + args.new_tokens,
        pad_token_id=0, bos_token_id=2, eos_token_id=2, attention_bias=False, mlp_bias=False)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    rng = np.random.default_rng(0)
    prompts = [" ".join(word(i) for i in rng.integers(4, args.vocab, args.prompt_len)) for _ in range(args.prompts)]
    return model, tokenizer, prompts


def time_generate(model, tokenizer, prompts, args) -> list[float]:
    import torch

    enc = tokenizer(prompts, return_tensors="pt")
    assert enc["input_ids"].shape == (args.prompts, args.prompt_len), enc["input_ids"].shape
    times = []
    with torch.inference_mode():
        for _ in range(args.steps + 1):
            t0 = time.perf_counter()
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 num_return_sequences=args.samples, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, pad_token_id=0)
            times.append(time.perf_counter() - t0)
    new = out.shape[1] - args.prompt_len
    assert out.shape[0] == args.prompts * args.samples and new == args.new_tokens, (out.shape, new)
    return times[1:]


def time_grpo(model, tokenizer, prompts, args) -> list[float]:
    import datasets
    import trl
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    def reward(completions, **_):  # both outcomes in most groups, so the loss has a gradient
        return [float(zlib.crc32(c.encode()) % 2) for c in completions]

    N = args.prompts * args.samples
    steps = args.steps + 1
    data = datasets.Dataset.from_dict({"prompt": [p for p in prompts for _ in range(steps)]})
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = trl.GRPOConfig(
            output_dir=out_dir, per_device_train_batch_size=N // args.micro_batches,
            gradient_accumulation_steps=args.micro_batches, num_generations=args.samples,
            max_completion_length=args.new_tokens, temperature=1.0, top_k=0, top_p=1.0, beta=0.0,
            learning_rate=1e-4, max_steps=steps, logging_steps=10 ** 6, save_strategy="no", report_to="none",
            use_cpu=True, bf16=False, seed=0, generation_kwargs={"min_new_tokens": args.new_tokens},
            disable_tqdm=True, dataloader_num_workers=0,
            gradient_checkpointing=False)  # TRL's default is True; tsched's bench does not recompute either
        trainer = trl.GRPOTrainer(model=model.train(), reward_funcs=reward, args=cfg, train_dataset=data,
                                  processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    assert len(timer.times) == steps, timer.times
    return timer.times[1:]


def run(args) -> dict:
    import torch
    import transformers
    import trl

    model, tokenizer, prompts = build(args)
    t_gen = statistics.median(time_generate(model, tokenizer, prompts, args))
    t_step = statistics.median(time_grpo(model, tokenizer, prompts, args))
    new_tokens = args.prompts * args.samples * args.new_tokens
    return {"versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
            "torch_threads": torch.get_num_threads(), "params": sum(p.numel() for p in model.parameters()),
            "generate_s": t_gen, "generate_tokens_per_s": new_tokens / t_gen, "grpo_step_s": t_step}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    shape_args(ap)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    result = run(args)
    print(f"HF generate {result['generate_s']:.3f} s ({result['generate_tokens_per_s']:.0f} new tokens/s), "
          f"TRL GRPO step {result['grpo_step_s']:.3f} s; {result['params'] / 1e6:.2f}M params, "
          f"torch {result['versions']['torch']}, {result['torch_threads']} threads")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
