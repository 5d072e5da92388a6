"""A smoke study for CI: GRPO and TP-Schedule x two seeds, a tiny model for a few steps.

    python -m tsched.study --study=smoke --root=/tmp/study-smoke

Checks the machinery end to end (shared SFT, runs, tables, claims, figures) in a few minutes on 2 CPU
cores; its numbers mean nothing (4 RL steps of a 20k-parameter model).
"""


def get_study():
    return {
        "methods": {m: f"configs/paper.py:method={m}" for m in ("grpo", "tp_schedule")},
        "baseline": "grpo",
        "seeds": [0, 1],
        "overrides": {  # tests/tiny.py's sizes, with fewer steps and problems
            "data.families": "arith,sort", "data.max_difficulty": 2, "data.train_size": 400, "data.eval_size": 40,
            "data.prompt_len": 20, "data.max_solution_tokens": 40, "tokenizer.vocab_size": 48,
            "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2, "model.head_dim": 8,
            "model.ffn_dim": 64, "sft.steps": 4, "sft.batch_size": 16, "sft.warmup_steps": 2,
            "rl.steps": 4, "rl.prompts_per_step": 4, "rl.group_size": 4, "rl.max_new_tokens": 40,
            "eval.num_problems": 8, "eval.batch_size": 8, "eval.every": 2, "train.checkpoint_every": 4,
            "train.log_every": 2, "train.progress": False, "verify.num_workers": 1,
        },
    }
