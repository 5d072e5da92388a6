"""The paper's comparison on the built-in tasks: six methods x three seeds, the four analysis claims judged.

    python -m tsched.study --study=paper [--seeds=0,1,2] [--parallel=2]

Each method is `configs/paper.py:method=<label>` (the default experiment's tasks, model, SFT and budget;
only the credit criterion and its schedule differ). Per seed, GRPO's run does the SFT and the other five
start RL from it: 3 SFTs and 18 RL runs in all. An evaluation every 40 RL steps traces accuracy over
training. Writes runs/study-paper/study.md (tables, claims, figures) and study.json; see the README,
"Studies". More seeds narrow the intervals: `--seeds=0,1,2,3,4`.
"""

METHODS = ("grpo", "tp_schedule", "entropy_adv", "entropy_adv_schedule", "forking", "forking_schedule")


def get_study():
    return {
        "methods": {m: f"configs/paper.py:method={m}" for m in METHODS},  # label: tsched.main --config
        "baseline": "grpo",  # its runs do each seed's SFT; the paired differences are against it
        "seeds": [0, 1, 2],
        "overrides": {"eval.every": 40},  # any config field, for every run
    }
