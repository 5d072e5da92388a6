"""Metrics at the edge: TensorBoard event files, a JSONL log, one summary line, and PNG curves."""

from __future__ import annotations

import json

import numpy as np
from etils import epath


def is_local(path) -> bool:
    return "://" not in str(path)


class MetricsWriter:
    """Writes `{name: float}` per step to `<run_dir>/tb` and `<run_dir>/metrics.jsonl`.

    On resume from RL step k, RL lines of steps after k (written by the killed run after its last
    checkpoint) are dropped, and SFT lines unless the SFT result was restored, so the log describes
    exactly the run that produced the final parameters. run_dir may be local or an object store
    (gs://, through etils.epath): object stores have no append, so there the JSONL file is rewritten
    at `flush()` (the trainer's log intervals and `close()`) rather than appended to per line.
    """

    def __init__(self, run_dir, resume_step: int = 0, keep_sft: bool = False):
        from tensorboardX import SummaryWriter

        self.path = epath.Path(run_dir) / "metrics.jsonl"
        self._lines = []
        if self.path.exists():
            rows = [(ln + "\n", json.loads(ln)) for ln in self.path.read_text().splitlines() if ln.strip()]
            self._lines = [ln for ln, r in rows
                           if (r["phase"] == "sft" and keep_sft) or (r["phase"] == "rl" and r["step"] <= resume_step)]
        self.path.write_text("".join(self._lines))  # the kept history (empty for a fresh run)
        self.tb = SummaryWriter(str(epath.Path(run_dir) / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, metrics: dict, phase: str = "rl") -> None:
        clean = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        for k, v in clean.items():
            self.tb.add_scalar(f"{phase}/{k}", v, step)
        line = json.dumps({"phase": phase, "step": step, **clean}) + "\n"
        self._lines.append(line)
        if is_local(self.path):
            with self.path.open("a") as f:
                f.write(line)

    def flush(self) -> None:
        """On an object store, rewrites the file with every line so far (local files are appended per line)."""
        if not is_local(self.path):
            self.path.write_text("".join(self._lines))
        self.tb.flush()

    def close(self) -> None:
        self.flush()
        self.tb.close()


def summary_line(step: int, total: int, m: dict) -> str:
    return (f"step {step}/{total} | reward {m['reward']:.3f} | acc {m['accuracy']:.3f} | r {m['magnitude']:.3f} "
            f"| opt-tokens {m['tokens_optimized_frac']:.2f} | H {m['entropy']:.3f} | len {m['response_len']:.1f} "
            f"| {m['sample_tokens_per_s']:.0f} tok/s | sample {m['sample_s']:.2f}s verify {m['verify_s']:.2f}s "
            f"update {m['update_s']:.2f}s")


def plot_curves(jsonl_path, png_path) -> None:
    """Reward, schedule magnitude, entropy by stage and optimized-token fraction over RL steps."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in epath.Path(jsonl_path).read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if r.get("phase") == "rl"]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    panels = [("reward / accuracy", ["reward", "accuracy"]), ("schedule", ["magnitude", "tokens_optimized_frac"]),
              ("entropy by stage", ["entropy_first10", "entropy_mid45_55", "entropy_last10"]),
              ("KL to initial policy", ["kl_bin0", "kl_bin4", "kl_bin9"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            if k in rows[0]:
                ax.plot(steps, [r.get(k, np.nan) for r in rows], label=k)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()  # through epath, so png_path may be on an object store
    fig.savefig(png, format="png", dpi=90)
    plt.close(fig)
    epath.Path(png_path).write_bytes(png.getvalue())
