"""Scheduled entropy-shaped advantage: the entropy bonus decays linearly to plain GRPO.

    python -m tsched.main --config=configs/entropy_adv_schedule.py

Same tasks, model, SFT and budget as configs/default.py; only the credit criterion / loss differ.
"""

from tsched.config import base_config


def get_config():
    c = base_config()
    c.run_dir = "runs/entropy_adv_schedule"
    c.rl.credit.strategy = "entropy_adv"
    c.rl.schedule.mode = "linear"
    return c
