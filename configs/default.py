"""Default experiment: TP-Schedule RLVR on the built-in tasks, on this 2-core CPU.

    python -m tsched.main --config=configs/default.py

A 0.6M-parameter decoder, sentencepiece vocab 64, arith/mult/gcd/sort at difficulty 1-4. SFT warm
start on the reference solutions, then RL with the trajectory-percentile criterion under the linear
schedule of the paper (r from 0.99 to 0 over the first 80% of steps), then greedy evaluation on 500
held-out problems. Sweep any field by flag, e.g. `--config.rl.steps=120 --config.rl.schedule.mode=sigmoid`.
"""

from tsched.config import base_config


def get_config():
    return base_config()
