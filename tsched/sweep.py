"""Local sweeps: every point of a grid of config overrides, each one `python -m tsched.main` run.

    python -m tsched.sweep --config=configs/default.py \
        --sweep=rl.credit.strategy=uniform,tp --sweep=seed=0,1,2 \
        [--parallel=1] [--root=runs/sweep] [--config.rl.steps=80 ...]

Each run writes to `<root>/<run name>/` (its output also goes to `stdout.log` there); the run name
comes from the swept values (`strategy=uniform,seed=0`). A run whose `summary.json` exists is skipped,
so a killed sweep continues where it stopped; an unfinished run resumes from its last checkpoint. At
the end `<root>/sweep.md` and `<root>/sweep.csv` hold one row per run (swept values, status and the
summary's scalar fields); the last line printed is the path of `sweep.md`. A failed run shows in the
table and makes the exit code 1; the other runs still run.

`expand` is also how `python -m launch.tpu sweep` names and splits a grid over TPU VMs: this module
imports nothing beyond the standard library at load time, so the launcher runs without JAX.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import time

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclasses.dataclass(frozen=True)
class Run:
    """One point of the grid: its name (a directory name) and its `(field, value)` overrides."""
    name: str
    overrides: tuple[tuple[str, str], ...]

    def flags(self) -> list[str]:
        return [f"--config.{field}={value}" for field, value in self.overrides]


def expand(specs: list[str]) -> list[Run]:
    """`['rl.credit.strategy=uniform,tp', 'seed=0,1']` -> the 4 runs of the product, first field slowest.

    A run is named by the last component of each field and the value (`strategy=uniform,seed=0`),
    the full field where two fields share their last component, and characters other than letters,
    digits and `._+-` in values replaced by `_`. Raises ValueError naming the bad `--sweep` value.
    """
    if not specs:
        raise ValueError("flag --sweep: give at least one FIELD=V1,V2,...")
    axes = []
    for spec in specs:
        field, sep, values = spec.partition("=")
        field, choices = field.strip(), [v.strip() for v in values.split(",")]
        if not sep or not field or not all(choices):
            raise ValueError(f"flag --sweep={spec!r}: expected FIELD=V1,V2,... (e.g. --sweep=seed=0,1,2)")
        if field in (f for f, _ in axes):
            raise ValueError(f"flag --sweep={spec!r}: field {field!r} is swept twice")
        if len(set(choices)) < len(choices):
            raise ValueError(f"flag --sweep={spec!r}: repeated value")
        axes.append((field, choices))
    leaves = [f.rsplit(".", 1)[-1] for f, _ in axes]
    labels = [leaf if leaves.count(leaf) == 1 else field for leaf, (field, _) in zip(leaves, axes)]
    runs = []
    for point in itertools.product(*(choices for _, choices in axes)):
        name = ",".join(f"{label}={_UNSAFE.sub('_', v)}" for label, v in zip(labels, point))
        runs.append(Run(name, tuple((f, v) for (f, _), v in zip(axes, point))))
    names = [r.name for r in runs]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"flag --sweep: values that differ only in unsafe characters give the same run name "
                         f"{clash[0]!r}")
    return runs


def check_configs(config: str, fixed: list[str], runs: list[Run]) -> list:
    """Parses every run's command line the way `tsched.main` will and validates it: a bad field,
    type or enum value fails here, before any run starts. Raises ValueError naming the flag.

    -> the runs' configs (`ml_collections.ConfigDict`), in the order of `runs`."""
    from absl import flags
    from ml_collections import config_flags

    from tsched.config import validate

    if not os.path.exists(config.split(":", 1)[0]):
        raise ValueError(f"flag --config={config}: no such file {config.split(':', 1)[0]!r}")
    configs = []
    for run in runs:
        argv = ["tsched.main", f"--config={config}", *fixed, *run.flags()]
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
        try:
            values(argv)
            validate(values.config)
        except AttributeError as e:  # what a locked ConfigDict raises for an unknown field: its last part
            leaf = re.escape(str(e).strip("'\""))
            flag = next((a for a in argv if re.match(rf"--config\.([\w.]*\.)?{leaf}=", a)), " ".join(argv[1:]))
            raise ValueError(f"run {run.name}: flag {flag}: unknown config field") from None
        except (flags.Error, OSError, ValueError) as e:
            raise ValueError(f"run {run.name}: {str(e).splitlines()[0]}") from None
        configs.append(values.config)
    return configs


def run_one(run: Run, config: str, fixed: list[str], root: str, env: dict | None = None) -> tuple[str, float]:
    """Runs `tsched.main` for one point (output to `<root>/<name>/stdout.log`) -> (status, seconds).
    env: the process environment (None: this one's).

    `train.resume=True` continues an interrupted run from its checkpoint; with no checkpoint it is a
    fresh run, and it keeps the trainer from moving the run directory (holding our log) aside.
    """
    run_dir = os.path.join(root, run.name)
    os.makedirs(run_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "tsched.main", f"--config={config}", *fixed, *run.flags(),
           f"--config.run_dir={run_dir}", "--config.train.resume=True"]
    start = time.monotonic()
    with open(os.path.join(run_dir, "stdout.log"), "a") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env).returncode
    return ("done" if code == 0 else f"failed (exit {code})"), time.monotonic() - start


def _scalars(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}


def write_table(root: str, runs: list[Run], status: dict[str, str]) -> str:
    """Writes `<root>/sweep.csv` and `<root>/sweep.md` (one row per run) -> the Markdown path."""
    rows = []
    for run in runs:
        path = os.path.join(root, run.name, "summary.json")
        summary = json.load(open(path)) if os.path.exists(path) else {}
        rows.append({"run": run.name, **dict(run.overrides), "status": status[run.name], **_scalars(summary)})
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(os.path.join(root, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    cell = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    md = os.path.join(root, "sweep.md")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    return md


def sweep(config: str, specs: list[str], fixed: list[str], root: str, parallel: int = 1,
          only: list[str] | None = None) -> tuple[str, bool]:
    """Runs the grid (or the runs named in `only`) -> (path of sweep.md, whether every run succeeded)."""
    runs = expand(specs)
    if only:
        unknown = sorted(set(only) - {r.name for r in runs})
        if unknown:
            raise ValueError(f"flag --only: {unknown[0]!r} is not a run of this grid; runs: {[r.name for r in runs]}")
        runs = [r for r in runs if r.name in only]
    check_configs(config, fixed, runs)
    os.makedirs(root, exist_ok=True)
    status = {}
    todo = []
    for run in runs:
        if os.path.exists(os.path.join(root, run.name, "summary.json")):
            status[run.name] = "cached"
            print(f"skip {run.name}: summary.json exists", flush=True)
        else:
            todo.append(run)
    with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
        futures = {pool.submit(run_one, run, config, fixed, root): run for run in todo}
        for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
            run = futures[future]
            status[run.name], seconds = future.result()
            log = os.path.join(root, run.name, "stdout.log")
            print(f"[{i}/{len(todo)}] {run.name}: {status[run.name]} in {seconds:.0f} s ({log})", flush=True)
    table = write_table(root, runs, status)
    return table, all(not s.startswith("failed") for s in status.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tsched.sweep", description=__doc__.split("\n\n")[0],
        epilog="Any --config.FIELD=VALUE is a fixed override passed to every run.")
    parser.add_argument("--config", default="configs/default.py",
                        help="config file, passed to tsched.main unchanged (a ':arg' suffix included)")
    parser.add_argument("--sweep", action="append", required=True, metavar="FIELD=V1,V2",
                        help="a swept config field and its values; repeat for a product")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--root", default="runs/sweep", help="directory of the run directories and the table")
    parser.add_argument("--only", action="append", metavar="RUN",
                        help="run only this run of the grid (repeatable); launch.tpu splits a grid over TPUs so")
    args, fixed = parser.parse_known_args(argv)
    bad = [a for a in fixed if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized argument {bad[0]!r}: only --config.FIELD=VALUE overrides pass through")
    if any(a.startswith("--config.run_dir") for a in fixed):
        parser.error("flag --config.run_dir: each run's directory is <--root>/<run name>; set --root instead")
    if args.parallel < 1:
        parser.error(f"flag --parallel={args.parallel}: must be >= 1")
    try:
        table, ok = sweep(args.config, args.sweep, fixed, args.root, args.parallel, args.only)
    except ValueError as e:
        parser.error(str(e))
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
