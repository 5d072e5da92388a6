"""Off-policy guidance: the prompt carries the first round(r L) tokens of the reference solution,
r decaying linearly, so early rollouts continue verified solutions and late ones are fully on-policy.

    python -m tsched.main --config=configs/off_policy_schedule.py

Same tasks, model, SFT and budget as configs/default.py; only the credit criterion / loss differ.
"""

from tsched.config import base_config


def get_config():
    c = base_config()
    c.run_dir = "runs/off_policy_schedule"
    c.rl.credit.strategy = "off_policy"
    c.rl.schedule.mode = "linear"
    return c
