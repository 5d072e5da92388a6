"""Schedule magnitude against an independent NumPy/Python reference written from REFERENCE.md."""

import math

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from tsched.rl import schedules

MODES = ["linear", "sigmoid", "gamma", "cosine", "rex", "constant"]


def sched(mode, m=0.99, lo=0.0, hi=0.8, total=100, gamma=2.0, k=8.0):
    return ConfigDict(dict(mode=mode, initial_magnitude=m, min_ratio=lo, max_ratio=hi, total_steps=total,
                           gamma=gamma, sigmoid_k=k))


def ref(step, c):
    s0, s1 = int(c.total_steps * c.min_ratio), int(c.total_steps * c.max_ratio)
    p = min(max((step - s0) / (s1 - s0), 0.0), 1.0)
    m = c.initial_magnitude
    sig = lambda x: 1.0 / (1.0 + math.exp(c.sigmoid_k * (x - 0.5)))
    return {"linear": m * (1 - p),
            "sigmoid": m * (sig(p) - sig(1)) / (sig(0) - sig(1)),
            "gamma": (m * (1 - p)) ** c.gamma,
            "cosine": m * 0.5 * (1 + math.cos(math.pi * p)),
            "rex": m * (1 - p) / (0.5 + 0.5 * (1 - p)),
            "constant": m}[c.mode]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lo,hi,total", [(0.0, 0.8, 100), (0.1, 0.5, 37), (0.0, 1.0, 7)])
def test_matches_reference_at_every_step(mode, lo, hi, total):
    c = sched(mode, lo=lo, hi=hi, total=total)
    steps = np.arange(0, total + 3)  # before the start (0), through, and past the end
    got = np.array([float(schedules.magnitude(s, c)) for s in steps])
    want = np.array([ref(int(s), c) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode,table", [
    ("linear", [0.990, 0.743, 0.495, 0.248, 0.0]),
    ("sigmoid", [0.990, 0.886, 0.495, 0.104, 0.0]),
    ("gamma", [0.980, 0.551, 0.245, 0.061, 0.0]),
])
def test_reference_table_values(mode, table):
    # total 100, decay over steps 0..80: p = 0, .25, .5, .75, 1 at steps 0, 20, 40, 60, 80
    c = sched(mode)
    got = [float(schedules.magnitude(s, c)) for s in (0, 20, 40, 60, 80)]
    np.testing.assert_allclose(got, table, atol=6e-4)


def test_before_start_and_after_end():
    c = sched("linear", lo=0.2, hi=0.6, total=50)
    assert float(schedules.magnitude(1, c)) == pytest.approx(0.99)
    assert float(schedules.magnitude(10, c)) == pytest.approx(0.99)
    assert float(schedules.magnitude(30, c)) == 0.0
    assert float(schedules.magnitude(10_000, c)) == 0.0


def test_traced_step_compiles_once():
    traces = []

    @jax.jit
    def f(step):
        traces.append(1)
        return schedules.magnitude(step, sched("sigmoid"))

    vals = [float(f(np.int32(s))) for s in range(1, 30)]
    assert len(traces) == 1
    np.testing.assert_allclose(vals, [ref(s, sched("sigmoid")) for s in range(1, 30)], rtol=1e-6, atol=1e-7)
    assert f(np.int32(5)).dtype == np.float32
