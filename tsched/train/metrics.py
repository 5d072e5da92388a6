"""Metrics at the edge: TensorBoard event files, a JSONL log, one summary line, and PNG curves."""

from __future__ import annotations

import json

import numpy as np
from etils import epath


def is_local(path) -> bool:
    return "://" not in str(path)


class MetricsWriter:
    """Writes `{name: float}` per step to `<run_dir>/tb` and `<run_dir>/metrics.jsonl`.

    A resumed phase calls `resume(phase, step)` with the step of its checkpoint: the lines of that phase's
    later steps (written by the killed run after its last checkpoint) are dropped, as is a last line a kill
    cut in half, so the log describes exactly the run that produced the final parameters: no step missing,
    none twice. A fresh phase calls it with step 0.

    run_dir may be local or an object store (gs://, through etils.epath). Object stores have no append:
    there the JSONL file is rewritten at `flush()` (the trainer's log intervals, `close()`) instead of
    appended to per line.
    """

    def __init__(self, run_dir, active: bool = True):
        """active=False: write nothing (the processes of a multi-host run other than process 0)."""
        from tensorboardX import SummaryWriter

        self.run_dir = epath.Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.active = active
        self.tb = SummaryWriter(str(self.run_dir / "tb")) if active else None
        self._lines = self._read() if active else []

    def _read(self) -> list[str]:
        lines = []
        for ln in self.path.read_text().splitlines() if self.path.exists() else []:
            try:
                lines.append((json.loads(ln), ln + "\n"))
            except json.JSONDecodeError:  # the line a kill interrupted
                continue
        return lines

    def resume(self, phase: str, step: int) -> None:
        if not self.active:
            return
        self._lines = [(r, ln) for r, ln in self._read() if r["phase"] != phase or r["step"] <= step]
        tmp = epath.Path(f"{self.path}.tmp")  # a kill leaves the old file or the new one
        tmp.write_text("".join(ln for _, ln in self._lines))
        tmp.replace(self.path)
        if phase == "rl" and step:
            from tensorboardX import SummaryWriter

            self.tb.close()
            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=step + 1)

    def write(self, step: int, metrics: dict, phase: str = "rl") -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        for k, v in clean.items():
            self.tb.add_scalar(f"{phase}/{k}", v, step)
        row = {"phase": phase, "step": step, **clean}
        line = json.dumps(row) + "\n"
        self._lines.append((row, line))
        if is_local(self.path):
            with self.path.open("a") as f:
                f.write(line)

    def flush(self) -> None:
        """On an object store, rewrites the file with every line so far (local files are appended per line)."""
        if not self.active:
            return
        if not is_local(self.path):
            self.path.write_text("".join(ln for _, ln in self._lines))
        self.tb.flush()

    def close(self) -> None:
        self.flush()
        if self.active:
            self.tb.close()


def summary_line(step: int, total: int, m: dict) -> str:
    return (f"step {step}/{total} | reward {m['reward']:.3f} | acc {m['accuracy']:.3f} | r {m['magnitude']:.3f} "
            f"| opt-tokens {m['tokens_optimized_frac']:.2f} | H {m['entropy']:.3f} | len {m['response_len']:.1f} "
            f"| {m['sample_tokens_per_s']:.0f} tok/s | sample {m['sample_s']:.2f}s verify {m['verify_s']:.2f}s "
            f"update {m['update_s']:.2f}s")


def plot_curves(jsonl_path: str, png_path: str) -> None:
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
    png = io.BytesIO()  # through epath, so png_path may be on an object store
    fig.savefig(png, format="png", dpi=90)
    plt.close(fig)
    epath.Path(png_path).write_bytes(png.getvalue())
