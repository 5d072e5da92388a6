"""Qwen3-4B TP-Schedule RL on a TPU v5e-8, in the spirit of the paper's reference run.

    python -m tsched.plan --config=configs/qwen3_4b_tpu.py --topology=v5e:2x4 --json plan.json

compiles the RL update and the sampler for a v5e-8 through libtpu (no TPU needed) and prints the memory
per chip; README "Will it fit?" has the measured table. Training it for real also needs the Qwen
checkpoint (`--config.model.init_from=DIR`) and a math dataset (`data.source`).

Reference run: 8 samples per prompt, clip 0.2 / 0.28 (dual clip 3), lr 1e-6, temperature 1.2, no KL,
token-mean, linear TP schedule over the first 80% of steps. The reference samples up to ~40k tokens with
256 prompts per step on larger pods; a v5e-8 (16 GiB HBM per chip) gets 64 prompts and 4k new tokens
here with at least 10% of HBM to spare: f32 master weights and Adam state, bf16 matmuls, tensor
parallelism over the 8 chips (heads, KV heads, MLP and vocabulary split; positions too between layers),
one sequence per micro-batch with rematerialised layers, log-probs 512 positions at a time, attention
over 512-key blocks, and the sampler 4 prompts (32 sequences) per pass.
"""

from tsched.config import base_config


def get_config():
    c = base_config()
    c.run_dir = "runs/qwen3_4b_tp"
    c.model.preset = "qwen3-4b"
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.scan_layers = True
    c.model.logits_chunk = 512
    c.model.attn_block = 512
    c.tokenizer.vocab_size = 151936
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 8
    c.data.prompt_len = 512
    c.rl.max_new_tokens = 4096
    c.rl.prompts_per_step = 64
    c.rl.group_size = 8
    c.rl.micro_batches = 512  # one sequence per micro-batch
    c.rl.prompt_pass = "per_row"  # the prompts' keys and values of all 64 prompts at once do not fit (tsched.plan)
    c.rl.prompts_per_pass = 4  # the sampler's KV caches: 32 sequences at a time
    c.rl.lr = 1e-6
    c.rl.temperature = 1.2
    c.rl.clip_low, c.rl.clip_high, c.rl.dual_clip = 0.2, 0.28, 3.0
    c.rl.kl_coef = 0.0
    c.rl.steps = 500
    c.train.kl_metrics = False  # a second 4B forward per step; enable when memory allows
    c.eval.samples = 1
    c.eval.batch_size = 64
    return c
