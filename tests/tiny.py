"""A tiny, fast variant of any experiment config, shared by the end-to-end tests."""

import sys

TINY = {
    "data.families": "arith,sort", "data.max_difficulty": 2, "data.train_size": 400, "data.eval_size": 40,
    "data.prompt_len": 20, "data.max_solution_tokens": 40, "tokenizer.vocab_size": 48,
    "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2, "model.head_dim": 8,
    "model.ffn_dim": 64, "sft.steps": 20, "sft.batch_size": 16, "sft.warmup_steps": 2,
    "rl.steps": 8, "rl.prompts_per_step": 4, "rl.group_size": 4, "rl.max_new_tokens": 40,
    "eval.num_problems": 40, "eval.batch_size": 20, "train.checkpoint_every": 2, "train.log_every": 2,
    "train.progress": False, "verify.num_workers": 1,
}


def set_field(cfg, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        cfg = cfg[p]
    cfg[leaf] = value


def tiny(cfg, tmp, name, **extra):
    """cfg with TINY (and `extra`, keys with '__' for '.') applied; run_dir under tmp, shared TFDS dir."""
    for k, v in {**TINY, **{k.replace("__", "."): v for k, v in extra.items()}}.items():
        set_field(cfg, k, v)
    cfg.run_dir = str(tmp / name)
    cfg.data.data_dir = str(tmp / "tfds")
    return cfg


def cli(cfg, config_file="configs/default.py", run_dir=None, **extra):
    """The command line that runs `cfg` (built by `tiny`) as `python -m tsched.main`."""
    args = [f"--config.{k}={v}" for k, v in TINY.items()]
    args += [f"--config.run_dir={run_dir or cfg.run_dir}", f"--config.data.data_dir={cfg.data.data_dir}"]
    args += [f"--config.{k}={v}" for k, v in extra.items()]
    return [sys.executable, "-m", "tsched.main", f"--config={config_file}", *args]
