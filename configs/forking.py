"""Static forking-token baseline ("80/20"): per response only the 20% highest-entropy tokens,
normalised by all valid tokens as in the 80/20 paper.

    python -m tsched.main --config=configs/forking.py

Same tasks, model, SFT and budget as configs/default.py; only the credit criterion / loss differ.
"""

from tsched.config import base_config


def get_config():
    c = base_config()
    c.run_dir = "runs/forking"
    c.rl.credit.strategy = "forking"
    c.rl.credit.normalizer = "valid_tokens"
    c.rl.schedule.mode = "constant"
    c.rl.schedule.initial_magnitude = 0.8  # keep ceil((1 - 0.8) n) tokens
    return c
