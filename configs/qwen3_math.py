"""TP-Schedule RL of a pretrained Hugging Face checkpoint on your math problems (the reference recipe).

The checkpoint and the files come from flags; everything else is the recipe below:

    python -m tsched.main --config=configs/qwen3_math.py \\
        --config.model.init_from=checkpoints/Qwen3-1.7B \\
        --config.data.train_files=data/train.jsonl \\
        --config.data.eval_files="math500=data/math500.jsonl;gsm8k=data/gsm8k_test.jsonl" \\
        --config.run_dir=runs/qwen3_math

    python -m tsched.eval --config=configs/qwen3_math.py --checkpoint=runs/qwen3_math \\
        --config.model.init_from=checkpoints/Qwen3-1.7B --config.data.train_files=data/train.jsonl \\
        --config.data.eval_files="math500=data/math500.jsonl;gsm8k=data/gsm8k_test.jsonl"

The first writes checkpoints, metrics, `eval_after_rl.md` and the final policy as a Hugging Face
directory `runs/qwen3_math/hf` (transformers loads it; generation_config.json keeps every end id);
the second writes `eval.json` / `eval.md` (greedy, avg@8, pass@1/4/8, lengths, truncation per set).

Files: JSONL records `{"problem": ..., "answer": ...}` (optional `solution`, `verifier`, `family`,
`difficulty`; other names via `--config.data.fields.problem=question`), Parquet with
`--config.data.source=parquet`; see docs/data.md. Prompts: the `boxed` instruction the Qwen math
models were tuned with, `--config.data.template=chat` for the checkpoint's chat template (with
`--config.data.chat_thinking=True` for Qwen3's thinking mode and a larger rl.max_new_tokens).

Recipe (the paper's reference run): lr 1e-6, 8 samples per prompt at temperature 1.2, clip 0.2 / 0.28
with dual clip 3, no KL, token-mean aggregation, TP-Schedule (trajectory-percentile credit, linear
schedule from 0.99 to 0 over the first 80% of steps), math verifier. No SFT warm start (sft.steps
follows model.init_from). Hardware: an accelerator host for a real 0.6B-8B checkpoint (set the mesh,
e.g. --config.mesh.fsdp=8; check the fit with `python -m tsched.plan`); on a 2-core CPU only tiny
checkpoints are practical. Any field overrides, e.g. --config.rl.steps=500.
"""

from tsched.config import base_config


def get_config():
    c = base_config()
    c.run_dir = "runs/qwen3_math"
    c.model.init_from = ""  # --config.model.init_from=DIR (an HF checkpoint directory)
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.scan_layers = True

    c.data.source = "jsonl"
    c.data.train_files = ""  # --config.data.train_files=...
    c.data.eval_files = ""  # --config.data.eval_files="name=path;..."
    c.data.template = "boxed"
    c.data.verifier = "math"
    c.data.prompt_len = 512
    c.data.max_solution_tokens = 1024  # reference prefixes (rl.prompt_transform=reference_prefix) are cut here

    c.rl.steps = 200
    c.rl.prompts_per_step = 32
    c.rl.group_size = 8
    c.rl.micro_batches = 32  # 8 sequences per micro-batch
    c.rl.max_new_tokens = 2048
    c.rl.lr = 1e-6
    c.rl.temperature = 1.2
    c.rl.clip_low, c.rl.clip_high, c.rl.dual_clip = 0.2, 0.28, 3.0
    c.rl.kl_coef = 0.0
    c.rl.aggregation = "token-mean"
    c.rl.credit.strategy = "tp"
    c.rl.schedule.mode = "linear"
    c.rl.schedule.initial_magnitude, c.rl.schedule.min_ratio, c.rl.schedule.max_ratio = 0.99, 0.0, 0.8

    c.verify.timeout_s = 10.0
    c.verify.max_chars = 8192

    c.eval.num_problems = 500
    c.eval.batch_size = 64
    c.eval.samples = 8
    c.eval.pass_k = "1,4,8"
    c.eval.every = 50

    c.train.export_hf = True
    c.train.kl_metrics = False  # a second forward of the full model per step; enable when memory allows
    c.train.checkpoint_every = 25
    return c
