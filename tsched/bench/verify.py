"""Verifications per second of the verifier pool, for 1 and 2 workers.

    python -m tsched.bench.verify [--items 2000 --workers 1,2]

Scores a mix of completions (built-in task answers through `numeric` / `exact`, math answers through
math-verify, multiple choice) right and wrong, and prints a table of items per second and latency.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tsched.data import tasks
from tsched.verify.pool import VerifierPool


def workload(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    train, _ = tasks.make_splits(list(tasks.FAMILIES), 1, 4, n, 1, seed)
    items = []
    for i, p in enumerate(train):
        kind = i % 4
        if kind == 0:
            items.append((p.solution, p.answer, p.verifier))
        elif kind == 1:
            items.append((p.solution.rsplit(" ", 1)[0] + " 999", p.answer, p.verifier))
        elif kind == 2:
            a, b = int(rng.integers(1, 50)), int(rng.integers(2, 50))
            items.append((f"so the result is \\boxed{{\\frac{{{a}}}{{{b}}}}}", f"{a / b:.6f}".rstrip("0"), "math"))
        else:
            items.append((f"The answer is ({'ABCD'[i % 4]})", "ABCD"[(i // 4) % 4], "choice"))
    return items


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args(argv)
    items = workload(args.items)
    print(f"verifier pool throughput, {len(items)} items (1/4 each: task right, task wrong, math, choice)")
    print(f"{'workers':>7} {'items/s':>9} {'p50 ms':>8} {'p99 ms':>8}  statuses")
    for w in [int(x) for x in args.workers.split(",")]:
        with VerifierPool(num_workers=w, timeout_s=5.0) as pool:
            pool.score(*zip(*items[:20]))  # wait for warm workers
            t0 = time.perf_counter()
            out = pool.score(*zip(*items))
            dt = time.perf_counter() - t0
            lat = np.array([v.latency_s for v in out]) * 1e3
            counts = {s: sum(v.status == s for v in out) for s in sorted({v.status for v in out})}
            print(f"{w:>7} {len(items) / dt:>9.0f} {np.percentile(lat, 50):>8.2f} {np.percentile(lat, 99):>8.2f}  {counts}")


if __name__ == "__main__":
    main()
