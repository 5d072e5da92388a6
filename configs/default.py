"""Default experiment: TP-Schedule RLVR on the built-in tasks, on a 2-core CPU.

    python -m tsched.main --config=configs/default.py

A 0.6M-parameter decoder with a sentencepiece vocabulary trained on the tasks (digits split); the gcd
and sort families at difficulty 1-3. 300 SFT steps on the reference solutions, then 160 RL steps of
16 prompts x 8 samples with the trajectory-percentile criterion under the paper's linear schedule
(r from 0.99 to 0 over the first 80% of steps), then evaluation on 500 held-out problems (avg@4 and
greedy). About 10 minutes here; see docs/results.md for the measured result. Sweep any field by flag,
e.g. `--config.rl.steps=240 --config.rl.schedule.mode=sigmoid --config.run_dir=runs/sigmoid`.
"""

from tsched.config import base_config


def get_config():
    return base_config()
