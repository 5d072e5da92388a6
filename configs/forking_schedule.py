"""Scheduled forking tokens: the top-entropy subset widens from 1% to all tokens (r: 0.99 -> 0).

    python -m tsched.main --config=configs/forking_schedule.py

Same tasks, model, SFT and budget as configs/default.py; only the credit criterion / loss differ.
"""

from tsched.config import base_config


def get_config():
    c = base_config()
    c.run_dir = "runs/forking_schedule"
    c.rl.credit.strategy = "forking"
    c.rl.schedule.mode = "linear"
    return c
