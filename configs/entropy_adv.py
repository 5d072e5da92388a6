"""Static entropy-shaped advantage (Cheng et al. 2506.14758): A + min(alpha H, |A| / kappa) throughout.

    python -m tsched.main --config=configs/entropy_adv.py

Same tasks, model, SFT and budget as configs/default.py; only the credit criterion / loss differ.
"""

from tsched.config import base_config


def get_config():
    c = base_config()
    c.run_dir = "runs/entropy_adv"
    c.rl.credit.strategy = "entropy_adv"
    c.rl.schedule.mode = "constant"
    c.rl.schedule.initial_magnitude = 1.0
    return c
