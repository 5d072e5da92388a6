"""GSPO baseline: sequence-level importance ratio, seq-mean-token-mean aggregation. Sequence ratios
sit much closer to 1 than token ratios, hence the narrow clip range of the GSPO paper.

    python -m tsched.main --config=configs/gspo.py

Same tasks, model, SFT and budget as configs/default.py; only the credit criterion / loss differ.
"""

from tsched.config import base_config


def get_config():
    c = base_config()
    c.run_dir = "runs/gspo"
    c.rl.credit.strategy = "uniform"
    c.rl.loss = "gspo"
    c.rl.aggregation = "seq-mean-token-mean"
    c.rl.clip_low = 3e-4
    c.rl.clip_high = 4e-4
    c.rl.dual_clip = 0.0
    return c
