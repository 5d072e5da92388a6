"""TP-Schedule: only the last percentiles of each trajectory are optimized at first; the
optimized span grows linearly toward the start until whole trajectories at 80% of training.

    python -m tsched.main --config=configs/tp_schedule.py

Same tasks, model, SFT and budget as configs/default.py; only the credit criterion / loss differ.
"""

from tsched.config import base_config


def get_config():
    c = base_config()
    c.run_dir = "runs/tp_schedule"
    c.rl.credit.strategy = "tp"
    c.rl.schedule.mode = "linear"
    return c
