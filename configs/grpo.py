"""GRPO baseline: every response token gets the sequence advantage (the paper's reference point).

    python -m tsched.main --config=configs/grpo.py

Same tasks, model, SFT and budget as configs/default.py; only the credit criterion / loss differ.
"""

from tsched.config import base_config


def get_config():
    c = base_config()
    c.run_dir = "runs/grpo"
    c.rl.credit.strategy = "uniform"
    return c
