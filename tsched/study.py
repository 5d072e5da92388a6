"""Studies: methods x seeds on one SFT per seed, with the paper's claims judged over seeds.

    python -m tsched.study --study=paper [--seeds=0,1,2] [--parallel=N] [--root=runs/study-paper] \\
        [--config.rl.steps=80 ...]

A study is a file `configs/studies/<name>.py` (or any path to one) whose `get_study()` returns a
dict with `methods` ({label: experiment config, passed to tsched.main's --config as is, e.g.
'configs/paper.py:method=grpo'}), `baseline` (a label), `seeds` and `overrides` ({config field: value}
for every run; `--config.FIELD=VALUE` flags come after them).

Runs are `tsched.main` processes (tsched.sweep's machinery) in `<root>/method=<label>,seed=<s>/`. Per seed
the baseline's run does SFT; the seed's other methods start RL from its SFT checkpoint (`sft.warm_start`),
so every method of a seed starts from the same parameters and the differences between methods are paired
by seed; they take the baseline's evaluation before RL too (`eval.reuse_warm_start`) instead of repeating
it. Runs go `--parallel` at a time (default: the CPU cores // RUN_THREADS). A run whose summary.json
exists is skipped and an unfinished one resumes, so the same command continues a killed study; one line
is printed per finished run.

Then, from the runs' summary.json and metrics.jsonl, `<root>/study.md` (the tables, the four claims with
their verdicts and numbers, the figures), `study.json` (the same numbers) and the PNGs are written; the
last line printed is the path of study.md. A claim *holds* only when the paired 95% t-interval over
seeds excludes 0 in the claimed direction, is *contradicted* when it excludes 0 the other way, and is
*inconclusive* otherwise (CLAIMS). A failed run makes the exit code 1; the report covers what finished.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import re
import runpy
import sys
import time

import numpy as np

from tsched import sweep

# CPU cores one run is counted for in the default --parallel: the CPU experiments' runs are small-matrix
# work with Python between the steps (a tiny run: 57 s of CPU time in 88 s of wall time on a shared 2-core
# machine), so one run per core.
RUN_THREADS = 1
STAGES = {"entropy_first10": "first 10%", "entropy_mid45_55": "45-55%", "entropy_last10": "last 10%"}  # objective.STAGES
KL_BINS = 10  # tsched.rl.objective.KL_BINS (not imported: this module loads without JAX)
KL_POINTS = (0.3, 0.8)  # fractions of training at which the KL-by-percentile profiles are compared
WINDOW = 0.05  # KL profiles average the steps within +-5% of training of each point; curves smooth over 5%
LATE = 0.8  # "late" entropy: the steps after 80% of training
_LABEL = re.compile(r"^[A-Za-z0-9_.+-]+$")


# ---- Statistics (pure)

def t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df > 0 (Abramowitz & Stegun 26.7.3 / 26.7.4, exact)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # (2/pi) (theta + sin(theta) (cos(theta) + 2/3 cos^3(theta) + ... + cos^(df-2)(theta) ...))
        term = total = math.cos(theta) if df > 1 else 0.0
        for k in range(3, df - 1, 2):
            term *= c2 * (k - 1) / k
            total += term
        return 2 / math.pi * (theta + s * total)
    term = total = 1.0  # sin(theta) (1 + 1/2 cos^2(theta) + 1*3/(2*4) cos^4(theta) + ...)
    for k in range(2, df - 1, 2):
        term *= c2 * (k - 1) / k
        total += term
    return s * total


def t_quantile(df: int, confidence: float = 0.95) -> float:
    """The t with P(|T| <= t) = confidence (two-sided), by bisection on the exact distribution."""
    lo, hi = 0.0, 1.0
    while t_two_sided_mass(hi, df) < confidence:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_mass(mid, df) < confidence else (lo, mid)
    return (lo + hi) / 2


@dataclasses.dataclass(frozen=True)
class Interval:
    """Mean of n values and its 95% t-interval (lo, hi NaN when n < 2)."""
    mean: float
    lo: float
    hi: float
    n: int

    def text(self, fmt: str = "{:.3f}") -> str:
        if self.n == 0:
            return "-"
        if self.n < 2:
            return f"{fmt.format(self.mean)} (n=1)"
        return f"{fmt.format(self.mean)} [{fmt.format(self.lo)}, {fmt.format(self.hi)}]"


def interval(values) -> Interval:
    """The mean and 95% t-interval (df = n - 1) of the finite values."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    if len(x) == 1:
        return Interval(float(x[0]), math.nan, math.nan, 1)
    half = t_quantile(len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return Interval(float(x.mean()), float(x.mean() - half), float(x.mean() + half), len(x))


def paired(a: dict, b: dict) -> dict:
    """{seed: a[seed] - b[seed]} over the seeds where both are finite."""
    return {s: a[s] - b[s] for s in sorted(set(a) & set(b)) if np.isfinite(a[s]) and np.isfinite(b[s])}


def verdict(iv: Interval, sign: int) -> str:
    """'holds' when the interval excludes 0 on the claimed side (sign +1: > 0, -1: < 0), 'contradicted'
    when it excludes 0 on the other side, else 'inconclusive' (also with fewer than 2 values)."""
    if iv.n < 2 or not (np.isfinite(iv.lo) and np.isfinite(iv.hi)):
        return "inconclusive"
    if iv.lo > 0 or iv.hi < 0:
        return "holds" if (iv.lo > 0) == (sign > 0) else "contradicted"
    return "inconclusive"


# ---- What one run measured (pure: from its summary and its RL metric rows)

def accuracy(flat: dict) -> float:
    """The headline avg@k from `eval/<set>/avg@k` scalars, the mean over eval sets."""
    values = [v for k, v in flat.items() if re.fullmatch(r"eval/[^/]+/avg@\d+", k)]
    return float(np.mean(values)) if values else math.nan


def accuracy_curve(summary: dict, rows: list[dict]) -> list[tuple[int, float]]:
    """(RL step, accuracy): before RL at step 0, each periodic evaluation (`eval.every`), after RL."""
    points = {0: accuracy(summary["eval_per_set_before_rl"])}
    points.update({r["step"]: accuracy(r) for r in rows if any(k.startswith("eval/") for k in r)})
    points[summary["rl_steps"]] = accuracy(summary["eval_per_set_after_rl"])
    return sorted(points.items())


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one per-step metric."""
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=np.float64)) if pts else \
        (np.zeros(0, int), np.zeros(0))


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` values (fewer at the start)."""
    c = np.concatenate([[0.0], np.cumsum(values)])
    i = np.arange(1, len(values) + 1)
    start = np.maximum(i - window, 0)
    return (c[i] - c[start]) / (i - start)


def near(rows: list[dict], total: int, frac: float) -> list[dict]:
    """The rows within WINDOW of training of step frac * total, or the nearest one if none."""
    target, half = frac * total, WINDOW * total
    inside = [r for r in rows if abs(r["step"] - target) <= half]
    return inside or sorted(rows, key=lambda r: abs(r["step"] - target))[:1]


def kl_profile(rows: list[dict], total: int, frac: float) -> np.ndarray:
    """KL to the initial policy by trajectory-percentile bin [KL_BINS] around frac of training (NaN: not logged)."""
    keys = [f"kl_bin{i}" for i in range(KL_BINS)]
    picked = [r for r in near(rows, total, frac) if all(k in r for k in keys)]
    if not picked:
        return np.full(KL_BINS, math.nan)
    return np.mean([[r[k] for k in keys] for r in picked], axis=0)


def kl_centroid(profile: np.ndarray) -> float:
    """Where in the trajectory the KL sits: the KL-weighted mean percentile of the bins' centres (0..100);
    NaN when there is no KL (no update moved the policy)."""
    centres = (np.arange(KL_BINS) + 0.5) * 100 / KL_BINS
    mass = float(np.sum(profile))
    return float(np.sum(centres * profile) / mass) if np.isfinite(mass) and mass > 0 else math.nan


def run_scalars(summary: dict, rows: list[dict]) -> dict:
    """The per-run numbers the tables and claims compare."""
    total = summary["rl_steps"]
    curve = accuracy_curve(summary, rows)
    steps, ent = series(rows, "entropy")
    late = ent[steps > LATE * total]
    c30, c80 = (kl_centroid(kl_profile(rows, total, f)) for f in KL_POINTS)
    return {
        "start_accuracy": curve[0][1],
        "final_accuracy": curve[-1][1],
        "best_accuracy": max(a for s, a in curve if s > 0),
        "mean_entropy": float(ent.mean()) if len(ent) else math.nan,
        "late_entropy": float(late.mean()) if len(late) else math.nan,
        "kl_centroid_30": c30, "kl_centroid_80": c80, "kl_shift": c80 - c30,
    }


QUANTITIES = {  # name: what it is (the tables' captions)
    "start_accuracy": "accuracy before RL",
    "final_accuracy": "accuracy after RL",
    "best_accuracy": "best accuracy of the evaluations during and after RL",
    "mean_entropy": "sequence entropy (mean token entropy of the sampled responses), mean over RL steps",
    "late_entropy": f"sequence entropy, mean over the last {100 - round(100 * LATE)}% of RL steps",
    "kl_shift": "shift of the KL-weighted mean trajectory percentile from 30% to 80% of training "
                "(negative: the KL moves to earlier tokens)",
}


# ---- Claims (pure)

@dataclasses.dataclass(frozen=True)
class Test:
    """`quantity` of `method`, paired by seed against `versus` (None: against 0), claimed > 0 (sign +1) or < 0."""
    quantity: str
    method: str
    versus: str | None
    sign: int

    def text(self) -> str:
        what = f"{self.quantity} of {self.method}" + (f" - {self.versus}" if self.versus else "")
        return f"{what} {'>' if self.sign > 0 else '<'} 0"


@dataclasses.dataclass(frozen=True)
class Claim:
    key: str
    text: str
    tests: tuple[Test, ...]  # the claim holds when every test holds


CLAIMS = (
    Claim("tp_beats_grpo", "TP-Schedule beats GRPO in accuracy after RL",
          (Test("final_accuracy", "tp_schedule", "grpo", +1),)),
    Claim("tp_keeps_entropy", "TP-Schedule keeps the sequence entropy higher than GRPO (mean over RL steps)",
          (Test("mean_entropy", "tp_schedule", "grpo", +1),)),
    Claim("entropy_adv_collapses", "the entropy-shaped advantage used statically (entropy_adv) collapses the "
          "entropy, its scheduled version (entropy_adv_schedule) keeps it higher (late in training)",
          (Test("late_entropy", "entropy_adv_schedule", "entropy_adv", +1),)),
    Claim("tp_kl_moves_earlier", "under TP-Schedule the KL to the initial policy moves from later to earlier "
          "trajectory percentiles from 30% to 80% of training, more than under GRPO",
          (Test("kl_shift", "tp_schedule", None, -1), Test("kl_shift", "tp_schedule", "grpo", -1))),
)


def judge(claim: Claim, scalars: dict) -> dict:
    """scalars: {method: {seed: {quantity: value}}} -> the claim's verdict and, per test, the values per
    seed and their interval. Any test contradicted: contradicted; every test holds: holds; else inconclusive."""
    missing = sorted({m for t in claim.tests for m in (t.method, t.versus) if m and m not in scalars})
    if missing:
        return {"claim": claim.key, "text": claim.text, "verdict": f"not tested ({', '.join(missing)} not in the study)",
                "tests": []}
    tests = []
    for t in claim.tests:
        a = {s: v[t.quantity] for s, v in scalars[t.method].items()}
        values = paired(a, {s: v[t.quantity] for s, v in scalars[t.versus].items()}) if t.versus else \
            {s: x for s, x in a.items() if np.isfinite(x)}
        iv = interval(values.values())
        tests.append({"test": t.text(), "per_seed": values, "interval": dataclasses.asdict(iv),
                      "verdict": verdict(iv, t.sign)})
    verdicts = [t["verdict"] for t in tests]
    overall = ("contradicted" if "contradicted" in verdicts else
               "holds" if all(v == "holds" for v in verdicts) else "inconclusive")
    return {"claim": claim.key, "text": claim.text, "verdict": overall, "tests": tests}


def summarize(scalars: dict, baseline: str) -> dict:
    """Per method and quantity the interval over seeds, and the paired differences against the baseline."""
    out = {"per_method": {}, "versus_baseline": {}}
    for m, by_seed in scalars.items():
        out["per_method"][m] = {q: dataclasses.asdict(interval([v[q] for v in by_seed.values()])) for q in QUANTITIES}
        if m != baseline and baseline in scalars:
            out["versus_baseline"][m] = {}
            for q in QUANTITIES:
                d = paired({s: v[q] for s, v in by_seed.items()}, {s: v[q] for s, v in scalars[baseline].items()})
                out["versus_baseline"][m][q] = {"per_seed": d, "interval": dataclasses.asdict(interval(d.values()))}
    return out


# ---- The study file and its runs

@dataclasses.dataclass(frozen=True)
class Study:
    """What a study file's get_study() describes (see the module docstring)."""
    name: str
    methods: dict  # {label: experiment config for tsched.main's --config}
    baseline: str
    seeds: tuple[int, ...]
    overrides: dict  # {config field: value} for every run


@dataclasses.dataclass(frozen=True)
class StudyRun:
    method: str
    seed: int
    config: str  # the experiment config passed to tsched.main
    run: sweep.Run  # name (its directory under the root) and its own overrides (seed, warm start)


def load_study(name: str, seeds: str | None = None) -> Study:
    """`configs/studies/<name>.py` (or a path ending in .py) -> its get_study(), checked; `seeds`
    ('0,1,2') replaces its seeds. Raises ValueError naming what is wrong."""
    path = name if name.endswith(".py") else os.path.join("configs", "studies", f"{name}.py")
    if not os.path.isfile(path):
        raise ValueError(f"flag --study={name}: no such file {path!r}")
    s = runpy.run_path(path)["get_study"]()
    study = Study(os.path.basename(path).removesuffix(".py"), dict(s["methods"]), s["baseline"], tuple(s["seeds"]),
                  dict(s.get("overrides", {})))
    if seeds is not None:
        try:
            study = dataclasses.replace(study, seeds=tuple(int(x) for x in seeds.split(",")))
        except ValueError:
            raise ValueError(f"flag --seeds={seeds}: expected comma-separated integers") from None
    for label in study.methods:
        if not _LABEL.match(label):
            raise ValueError(f"study {path}: method label {label!r}: use letters, digits and ._+-")
    if study.baseline not in study.methods:
        raise ValueError(f"study {path}: baseline {study.baseline!r} is not one of the methods {list(study.methods)}")
    if not study.seeds or len(set(study.seeds)) < len(study.seeds):
        raise ValueError(f"study {path}: seeds {list(study.seeds)}: give distinct seeds")
    return study


def plan(study: Study, root: str, share_sft: bool = True) -> list[StudyRun]:
    """The runs, per seed the baseline's first; with share_sft the others warm-start from its SFT."""
    runs = []
    for seed in study.seeds:
        base_dir = os.path.join(root, run_name(study.baseline, seed))
        for method in [study.baseline, *(m for m in study.methods if m != study.baseline)]:
            own = [("seed", str(seed))]
            if share_sft and method != study.baseline:
                own.append(("sft.warm_start", base_dir))
            runs.append(StudyRun(method, seed, study.methods[method], sweep.Run(run_name(method, seed), tuple(own))))
    return runs


def run_name(method: str, seed: int) -> str:
    return f"method={method},seed={seed}"


def fixed_flags(study: Study, extra: list[str]) -> list[str]:
    """The study's overrides as flags, then the command line's (which win)."""
    return [f"--config.{k}={v}" for k, v in study.overrides.items()] + extra


def check(study: Study, runs: list[StudyRun], fixed: list[str]) -> int:
    """Validates every run's config before any starts (ValueError naming the run and the flag) and that each
    method's SFT is the baseline's (else the warm start would refuse). -> the SFT steps the runs share (0: a
    config with no SFT, e.g. from a pretrained model, has none to share)."""
    from tsched.config import sft_steps, warm_start_differences

    cfgs = {}
    for r in runs:  # validated without the warm start, which exists only once the baseline has run
        own = sweep.Run(r.run.name, tuple(o for o in r.run.overrides if o[0] != "sft.warm_start"))
        cfgs[r.method, r.seed] = sweep.check_configs(r.config, fixed, [own])[0]
    steps = sft_steps(cfgs[study.baseline, study.seeds[0]])
    for (method, seed), cfg in cfgs.items():
        diffs = warm_start_differences(cfg, cfgs[study.baseline, seed].to_json_best_effort()) if steps else []
        if diffs:
            raise ValueError(f"run {run_name(method, seed)}: its SFT would differ from the baseline's "
                             f"{study.baseline!r} ({'; '.join(diffs)}), so it cannot share that SFT")
    return steps


def execute(study: Study, runs: list[StudyRun], fixed: list[str], root: str, parallel: int, sft_steps: int,
            env: dict | None = None) -> dict:
    """Runs what is not finished, each seed's baseline before the others of that seed (whose SFT, of
    `sft_steps` steps, they start from) -> {run name: status}."""
    from tsched.train.checkpoint import complete_steps

    done = lambda r: os.path.exists(os.path.join(root, r.run.name, "summary.json"))
    status = {r.run.name: "cached" for r in runs if done(r)}
    for name in status:
        print(f"skip {name}: summary.json exists", flush=True)
    todo = len(runs) - len(status)
    base = {r.seed: r for r in runs if r.method == study.baseline}
    waiting = {s: [r for r in runs if r.seed == s and r is not base[s] and not done(r)] for s in base}
    with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
        pending = {}

        def submit(r: StudyRun) -> None:
            pending[pool.submit(sweep.run_one, r.run, r.config, fixed, root, env)] = r

        def release(seed: int) -> None:  # the seed's other methods, once its SFT checkpoint is there
            for r in waiting.pop(seed):
                warm = dict(r.run.overrides).get("sft.warm_start")
                if warm is None or sft_steps in complete_steps(os.path.join(warm, "ckpt", "sft")):
                    submit(r)
                else:
                    status[r.run.name] = f"not run (no SFT checkpoint in {warm})"
                    print(f"{r.run.name}: {status[r.run.name]}", flush=True)

        for seed, r in base.items():
            release(seed) if done(r) else submit(r)
        finished = 0
        while pending:
            for future in concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)[0]:
                r = pending.pop(future)
                status[r.run.name], seconds = future.result()
                finished += 1
                log = os.path.join(root, r.run.name, "stdout.log")
                print(f"[{finished}/{todo}] {r.run.name}: {status[r.run.name]} in {seconds:.0f} s ({log})", flush=True)
                if r.method == study.baseline:
                    release(r.seed)
    return status


# ---- Reading the runs and writing the report (side effects at the edge)

def read_run(run_dir: str) -> tuple[dict, list[dict]] | None:
    """(summary, RL metric rows by step) of a finished run, None if it has no summary.json."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return None
    rows = [json.loads(ln) for ln in open(os.path.join(run_dir, "metrics.jsonl")) if ln.strip()]
    return json.load(open(path)), sorted((r for r in rows if r.get("phase") == "rl"), key=lambda r: r["step"])


def _band(curves: list[tuple[np.ndarray, np.ndarray]]):
    """(x, mean, min, max) over the curves at the x every curve has."""
    common = sorted(set.intersection(*(set(np.asarray(x).tolist()) for x, _ in curves)))
    ys = np.array([[dict(zip(np.asarray(x).tolist(), y))[c] for c in common] for x, y in curves])
    return np.array(common), ys.mean(0), ys.min(0), ys.max(0)


def plot(path: str, panels: list[tuple[str, str, dict]], ylabel: str, note: str) -> None:
    """One PNG: per panel (title, x label, {method: [(x, y) per seed]}) a mean line and a min-max band per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (title, xlabel, by_method) in zip(axes[0], panels):
        for method, curves in by_method.items():
            curves = [(x, y) for x, y in curves if len(x)]
            if not curves:
                continue
            x, mean, lo, hi = _band(curves)
            (line,) = ax.plot(x, mean, label=f"{method} (n={len(curves)})", marker="." if len(x) < 30 else None)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(note, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def figures(root: str, data: dict, metric: str) -> dict:
    """Writes the analysis PNGs from {method: {seed: (summary, rows)}} -> {name: file name}."""
    total = max(s["rl_steps"] for by_seed in data.values() for s, _ in by_seed.values())
    window = max(1, round(WINDOW * total))
    band = "lines: mean over seeds; bands: min-max over seeds"
    per_method = lambda f: {m: [f(s, rows) for s, rows in by_seed.values()] for m, by_seed in data.items()}

    def smoothed(key):
        def f(summary, rows):
            x, y = series(rows, key)
            return x, smooth(y, window)
        return f

    pct = (np.arange(KL_BINS) + 0.5) * 100 / KL_BINS
    files = {"accuracy": "accuracy.png", "entropy": "entropy.png", "entropy_stages": "entropy_stages.png",
             "kl_percentile": "kl_percentile.png"}
    plot(os.path.join(root, files["accuracy"]),
         [("accuracy over training (step 0: before RL)", "RL step",
           per_method(lambda s, rows: tuple(map(np.array, zip(*accuracy_curve(s, rows))))))],
         metric, band)
    plot(os.path.join(root, files["entropy"]),
         [("sequence entropy over training", "RL step", per_method(smoothed("entropy")))],
         "mean token entropy", f"{band}; trailing mean over {window} steps")
    plot(os.path.join(root, files["entropy_stages"]),
         [(f"entropy of the {where} of each response", "RL step", per_method(smoothed(k))) for k, where in STAGES.items()],
         "mean token entropy", f"{band}; trailing mean over {window} steps")
    plot(os.path.join(root, files["kl_percentile"]),
         [(f"KL to the initial policy at {round(100 * f)}% of training", "trajectory percentile",
           per_method(lambda s, rows, f=f: (pct, kl_profile(rows, s["rl_steps"], f)))) for f in KL_POINTS],
         "KL per token (rl.kl_estimator)", f"{band}; mean of the steps within {round(100 * WINDOW)}% of training of each point")
    return files


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def markdown(study: Study, order: list[str], status: dict, wall: dict, stats: dict, claims: list[dict], files: dict,
             metric: str) -> str:
    """study.md: the accuracy table, the paired differences against the baseline, the claims, the figures."""
    methods = list(study.methods)
    pm, vb = stats["per_method"], stats["versus_baseline"]
    iv = lambda d, fmt="{:.3f}": Interval(**d).text(fmt)
    lines = [f"# Study `{study.name}`", "",
             f"{len(methods)} methods x seeds {list(study.seeds)}; each seed's methods start RL from the SFT of its "
             f"`{study.baseline}` run. Accuracy is {metric} on the held-out problems. Cells: mean over seeds "
             f"[95% t-interval of the mean] (n = seeds with a finished run). Overrides of every run: "
             f"`{json.dumps(study.overrides)}`.", "",
             "## Accuracy", "",
             "| method | seeds | before RL | after RL (final) | best (during and after RL) |", "| --- | --- | --- | --- | --- |"]
    for m in methods:
        q = pm.get(m)
        lines.append(f"| {m} | {q['final_accuracy']['n'] if q else 0} | " + " | ".join(
            iv(q[k]) if q else "-" for k in ("start_accuracy", "final_accuracy", "best_accuracy")) + " |")
    lines += ["", "## Entropy and KL", "",
              "| method | mean entropy (RL) | late entropy | KL centroid shift (percentile points) |",
              "| --- | --- | --- | --- |"]
    for m in methods:
        q = pm.get(m)
        lines.append(f"| {m} | " + " | ".join(iv(q[k], f) if q else "-" for k, f in (
            ("mean_entropy", "{:.3f}"), ("late_entropy", "{:.3f}"), ("kl_shift", "{:+.1f}"))) + " |")
    lines += ["", f"## Paired differences against `{study.baseline}` (method - {study.baseline}, per seed)", "",
              "| method | quantity | per seed | mean [95% interval] |", "| --- | --- | --- | --- |"]
    for m, by_q in vb.items():
        for q in ("final_accuracy", "best_accuracy", "mean_entropy", "late_entropy", "kl_shift"):
            d = by_q[q]
            per_seed = ", ".join(f"{s}: {_signed(v)}" for s, v in d["per_seed"].items()) or "-"
            lines.append(f"| {m} | {q} | {per_seed} | {iv(d['interval'], '{:+.3f}')} |")
    lines += ["", "Quantities: " + "; ".join(f"`{k}` {v}" for k, v in QUANTITIES.items()) + ".", "",
              "## Claims", "",
              "A claim *holds* only when the paired 95% t-interval over seeds excludes 0 in the claimed direction "
              "(for every test it needs), is *contradicted* when an interval excludes 0 the other way, and is "
              "*inconclusive* otherwise.", ""]
    for i, c in enumerate(claims, 1):
        lines.append(f"{i}. **{c['verdict']}**: {c['text']}.")
        for t in c["tests"]:
            per_seed = ", ".join(f"seed {s}: {_signed(v)}" for s, v in t["per_seed"].items()) or "no seeds"
            lines.append(f"   - `{t['test']}`: {per_seed}; mean {iv(t['interval'], '{:+.3f}')} -> {t['verdict']}")
    lines += ["", "## Figures", "", "Lines: means over seeds; bands: min-max over seeds (the tables give the intervals). "
              f"Curves over training are trailing means over {100 * WINDOW:g}% of the RL steps; the KL profiles average "
              f"the steps within {100 * WINDOW:g}% of training of the {' and '.join(f'{100 * f:g}%' for f in KL_POINTS)} "
              f"points.", ""] + [f"![{k}]({f})" for k, f in files.items()]
    lines += ["", "## Runs", "", "| run | status | wall time s |", "| --- | --- | --- |"]
    lines += [f"| {n} | {status.get(n, '')} | {wall.get(n, '')} |" for n in order]
    return "\n".join(lines) + "\n"


def report(study: Study, runs: list[StudyRun], root: str, status: dict) -> str:
    """Reads the finished runs, judges the claims, writes study.md, study.json and the PNGs -> path of study.md."""
    data, wall = {}, {}
    for r in runs:
        got = read_run(os.path.join(root, r.run.name))
        if got:
            data.setdefault(r.method, {})[r.seed] = got
            wall[r.run.name] = f"{got[0]['wall_time_s']:.0f}"
    scalars = {m: {s: run_scalars(*got) for s, got in by_seed.items()} for m, by_seed in data.items()}
    stats = summarize(scalars, study.baseline)
    claims = [judge(c, scalars) for c in CLAIMS]
    metric = next((got[0]["eval_accuracy_metric"] for by_seed in data.values() for got in by_seed.values()), "")
    files = figures(root, data, metric) if data else {}
    order = [r.run.name for r in runs]
    md = os.path.join(root, "study.md")
    with open(md, "w") as f:
        f.write(markdown(study, order, status, wall, stats, claims, files, metric))
    with open(os.path.join(root, "study.json"), "w") as f:
        json.dump({**dataclasses.asdict(study), "status": {n: status.get(n, "") for n in order},
                   "runs": scalars, **stats, "claims": claims, "figures": files}, f, indent=2)
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tsched.study", description=__doc__.split("\n\n")[0],
        epilog="Any --config.FIELD=VALUE overrides that field in every run (after the study's overrides).")
    parser.add_argument("--study", required=True, help="configs/studies/<NAME>.py, or a path to a study file")
    parser.add_argument("--seeds", help="comma-separated seeds instead of the study's")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument("--parallel", type=int, default=max(1, cores // RUN_THREADS),
                        help="runs at once (default: CPU cores // %(const)s)".replace("%(const)s", str(RUN_THREADS)))
    parser.add_argument("--root", help="directory of the runs and the report (default runs/study-<NAME>)")
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized argument {bad[0]!r}: only --config.FIELD=VALUE overrides pass through")
    for field, instead in (("run_dir", "--root"), ("seed", "--seeds"), ("sft.warm_start", "nothing: the study sets it")):
        if any(a.startswith(f"--config.{field}=") for a in extra):
            parser.error(f"flag --config.{field}: set by the study per run; use {instead}")
    if args.parallel < 1:
        parser.error(f"flag --parallel={args.parallel}: must be >= 1")
    try:
        study = load_study(args.study, args.seeds)
        root = args.root or os.path.join("runs", f"study-{study.name}")
        fixed = fixed_flags(study, extra)
        sft_steps = check(study, plan(study, root), fixed)
    except ValueError as e:
        parser.error(str(e))
    runs = plan(study, root, share_sft=sft_steps > 0)
    os.makedirs(root, exist_ok=True)
    # The runs share one persistent compilation cache: a method's programs compile once, not once per seed.
    env = {"JAX_COMPILATION_CACHE_DIR": os.path.join(root, ".jax_cache"), **os.environ}
    t0 = time.monotonic()
    status = execute(study, runs, fixed, root, args.parallel, sft_steps, env)
    print(f"study {study.name}: {len(runs)} runs in {time.monotonic() - t0:.0f} s", flush=True)
    print(report(study, runs, root, status))
    return 0 if all(not s.startswith(("failed", "not run")) for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
