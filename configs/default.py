"""Default experiment: TP-Schedule RLVR on the built-in tasks, on a 2-core CPU.

    python -m tsched.main --config=configs/default.py

The long-trace regime of the paper at toy scale: `chain` problems (running sums of 6-12 digits, one
addition per step, 55-110 tokens with the answer only at the end) whose reference solutions slip, at 6%
of steps, to an off-by-one result and carry on from it (`data.solution_error_rate`). 400 SFT steps teach
a 0.6M-parameter decoder the steps (greedy accuracy about 99%) and, with them, the slips: sampled at
temperature 1 it fails about 40% of problems, at any point of the trace. Then 80 RL steps of 16 prompts
x 8 samples with the trajectory-percentile criterion under the paper's linear schedule (r from 0.99 to 0
over the first 80% of steps), and evaluation on 500 held-out problems (avg@4 and greedy). About 7
minutes here; docs/results.md has the measured result over seeds 0, 1, 2 (+16 to +20 points avg@4). Sweep any field by flag, e.g.
`--config.rl.steps=160 --config.rl.schedule.mode=sigmoid --config.run_dir=runs/sigmoid`.
"""

from tsched.config import base_config


def get_config():
    return base_config()
