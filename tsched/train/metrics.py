"""Metrics at the edge: TensorBoard event files, a JSONL log, one summary line, and PNG curves."""

from __future__ import annotations

import json
import os

import numpy as np


class MetricsWriter:
    """Writes `{name: float}` per step to `<run_dir>/tb` and `<run_dir>/metrics.jsonl`.

    On resume from RL step k, RL lines of steps after k (written by the killed run after its last
    checkpoint) are dropped, and SFT lines unless the SFT result was restored, so the log describes
    exactly the run that produced the final parameters.
    """

    def __init__(self, run_dir: str, resume_step: int = 0, keep_sft: bool = False):
        from tensorboardX import SummaryWriter

        self.path = os.path.join(run_dir, "metrics.jsonl")
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                rows = [(ln, json.loads(ln)) for ln in f if ln.strip()]
            kept = [ln for ln, r in rows
                    if (r["phase"] == "sft" and keep_sft) or (r["phase"] == "rl" and r["step"] <= resume_step)]
        with open(self.path, "w") as f:
            f.writelines(kept)
        self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, metrics: dict, phase: str = "rl") -> None:
        clean = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        for k, v in clean.items():
            self.tb.add_scalar(f"{phase}/{k}", v, step)
        with open(self.path, "a") as f:
            f.write(json.dumps({"phase": phase, "step": step, **clean}) + "\n")

    def close(self) -> None:
        self.tb.close()


def summary_line(step: int, total: int, m: dict) -> str:
    return (f"step {step}/{total} | reward {m['reward']:.3f} | acc {m['accuracy']:.3f} | r {m['magnitude']:.3f} "
            f"| opt-tokens {m['tokens_optimized_frac']:.2f} | H {m['entropy']:.3f} | len {m['response_len']:.1f} "
            f"| {m['sample_tokens_per_s']:.0f} tok/s | sample {m['sample_s']:.2f}s verify {m['verify_s']:.2f}s "
            f"update {m['update_s']:.2f}s")


def plot_curves(jsonl_path: str, png_path: str) -> None:
    """Reward, schedule magnitude, entropy by stage and optimized-token fraction over RL steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in open(jsonl_path) if ln.strip()]
    rows = [r for r in rows if r.get("phase") == "rl"]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    panels = [("reward / accuracy", ["reward", "accuracy"]), ("schedule", ["magnitude", "tokens_optimized_frac"]),
              ("entropy by stage", ["entropy_first10", "entropy_mid45_55", "entropy_last10"]),
              ("KL to initial policy", ["kl_bin0", "kl_bin4", "kl_bin9"])]
    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/") and ("accuracy" in k or "/avg@" in k)})
    if eval_keys:  # eval.every: the periodic evaluation, at the steps it ran
        panels.append(("evaluation", eval_keys))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            pts = [(s, r[k]) for s, r in zip(steps, rows) if k in r]
            if pts:
                ax.plot(*zip(*pts), label=k, marker="." if k.startswith("eval/") else None)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
