"""Qwen3-4B TP-Schedule RL on a TPU v5e-8, in the spirit of the paper's reference run.

    python -m tsched.plan --config=configs/qwen3_4b_tpu.py --simulate_devices=8

prints the per-device memory of the RL update on a v5e-8 mesh from abstract shapes (no weights).
Training it for real also needs the Qwen checkpoint and tokenizer wired into the trainer and a math
dataset reader, which are not in tsched yet (weights load with tsched.model.load_pretrained).

Reference run: 8 samples per prompt, clip 0.2 / 0.28 (dual clip 3), lr 1e-6, temperature 1.2, no KL,
token-mean, linear TP schedule over the first 80% of steps. The reference samples up to ~40k tokens with
256 prompts per step on larger pods; a v5e-8 (16 GiB HBM per chip) gets 64 prompts and 4k new tokens
here, fully sharded (FSDP over 8 chips), bf16 matmuls with remat. Check the fit with tsched.plan.
"""

from tsched.config import base_config


def get_config():
    c = base_config()
    c.run_dir = "runs/qwen3_4b_tp"
    c.model.preset = "qwen3-4b"
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.scan_layers = True
    c.tokenizer.vocab_size = 151936
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
    c.data.prompt_len = 512
    c.rl.max_new_tokens = 4096
    c.rl.prompts_per_step = 64
    c.rl.group_size = 8
    c.rl.micro_batches = 64  # 8 sequences per micro-batch, one per chip
    c.rl.lr = 1e-6
    c.rl.temperature = 1.2
    c.rl.clip_low, c.rl.clip_high, c.rl.dual_clip = 0.2, 0.28, 3.0
    c.rl.kl_coef = 0.0
    c.rl.steps = 500
    c.train.kl_metrics = False  # a second 4B forward per step; enable when memory allows
    c.eval.samples = 1
    return c
