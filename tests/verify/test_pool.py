"""The verifier pool under attack: adversarial completions, hangs, crashes, killed workers."""

import concurrent.futures
import math
import os
import signal
import time

import pytest

from tsched.verify.pool import VerifierPool

TIMEOUT_S = 1.0
SLACK_S = 3.0  # process replacement and scheduling on a loaded 2-core machine
PLUGIN = ("tests.verify.hostile_verifiers",)


def adversarial_corpus():
    """(completion, answer, verifier) items that must all score 0 without harming the pool."""
    tower = r"\boxed{9^{9^{9^{9}}}}"
    items = [
        (tower, "1", "math"), ("Answer: 9**9**9**9", "1", "numeric"), (r"\boxed{2^{2^{2^{2^{2}}}}}", "3", "math"),
        (r"\boxed{10^{1000000}}", "7", "math"), (r"\boxed{100000!}", "7", "math"), (r"\boxed{(10^{10})^{10^{10}}}", "1", "math"),
        ("Answer: " + "9" * 100000, "9", "numeric"), (r"\boxed{" + "9" * 100000 + "}", "9", "math"),
        ("x" * 2**20, "1", "math"), ("Answer: 1" + " pad" * 300000, "2", "exact"), ("a" * 2**20 + "Answer: 5", "6", "numeric"),
        ("{" * 50000 + "}" * 50000, "1", "math"), (r"\boxed{" * 20000 + "1" + "}" * 20000, "2", "math"),
        (r"\boxed{" * 5000, "1", "math"), (r"\frac{" * 3000 + "1" + "}{2}" * 3000, "1", "math"),
        (r"\left(" * 2000 + "x" + r"\right)" * 2000, "1", "math"), ("((((((((((((((((((((" * 500, "1", "math"),
        ("Answer: \x00\x00\x00", "0", "numeric"), ("\x00" * 10000, "1", "math"), (b"\xff\xfe\xfd garbage".decode("latin-1"), "1", "math"),
        ("Answer: \udcff\udcfe", "1", "exact"), (b"\xc3\x28 Answer: \xe2\x28\xa1".decode("utf-8", "surrogateescape"), "1", "numeric"),
        (r"\boxed{\frac{}{}}", "1", "math"), (r"\boxed{)(}", "1", "math"), (r"\boxed{\begin{matrix}}", "1", "math"),
        (r"\boxed{\sqrt[}", "1", "math"), (r"\boxed{1/0}", "1", "math"), (r"\boxed{0^0}", "2", "math"),
        (r"\boxed{\infty - \infty}", "1", "math"), (r"\boxed{\int_0^\infty e^{x^2} dx}", "1", "math"),
        (r"\boxed{\lim_{x\to0}}", "1", "math"), (r"\boxed{\\\\\\\\}", "1", "math"), (r"\boxed{$$$$}", "1", "math"),
        (r"\boxed{x^{1000000}}", "1", "math"), (r"\boxed{\underbrace{}}", "1", "math"), (r"\boxed{1e999999}", "1", "math"),
        ("Answer: 1e999999", "1", "numeric"), ("Answer: nan", "1", "numeric"), ("Answer: inf", "1", "numeric"),
        ("Answer: 1/0", "1", "numeric"), ("Answer: ---1", "1", "numeric"), ("Answer: " + "1/" * 1000 + "1", "1", "numeric"),
        ("Answer: (Z)", "A", "choice"), ("(" * 100000, "A", "choice"), ("Answer: " + "A" * 100000, "B", "choice"),
        ("", "1", "math"), ("", "1", "numeric"), (" ", "1", "exact"), ("Answer:", "1", "exact"),
        ("Answer: 1", "1", "no_such_verifier"), ("#### " + "9" * 70, "9", "math"), ("####", "1", "math"),
        (r"\boxed{\boxed{\boxed{\boxed{}}}}", "1", "math"), (r"\boxed{" + r"\sqrt{" * 400 + "2" + "}" * 401, "1", "math"),
    ]
    return items


CORRECT = [("1+2=3. Answer: 3", "3", "numeric"), (r"so \boxed{\frac{1}{2}}", "0.5", "math"),
           ("min 1. min 2. Answer: 1 2", "1 2", "exact"), ("The answer is (C)", "C", "choice"),
           ("#### 72", "72", "math"), (r"\boxed{x=3}", "3", "math")]


def test_adversarial_batch_scores_zero_and_correct_answers_survive():
    bad = adversarial_corpus()
    assert len(bad) >= 50
    items = []
    for i, b in enumerate(bad):  # correct answers interleaved with the attack
        items.append(b)
        if i % 8 == 0:
            items += CORRECT
    with VerifierPool(num_workers=2, timeout_s=TIMEOUT_S, memory_mb=1024) as pool:
        t0 = time.monotonic()
        out = pool.score(*zip(*items))
        elapsed = time.monotonic() - t0
        k = sum(v.status == "timeout" for v in out)
        assert elapsed <= math.ceil(k / 2) * TIMEOUT_S + SLACK_S + 0.05 * len(items), (elapsed, k)
        for item, v in zip(items, out):
            if item in CORRECT:
                assert (v.reward, v.status) == (1.0, "ok"), item[0][:80]
            else:
                assert v.reward == 0.0, item[0][:80]
                assert v.status in ("wrong", "no_answer", "timeout", "crashed", "error")
        # the pool is healthy afterwards
        assert [v.reward for v in pool.score(*zip(*CORRECT))] == [1.0] * len(CORRECT)
        assert pool.alive() == 4


def test_hangs_are_killed_at_the_deadline_without_stalling_others():
    items = [("", "", "hang")] * 4 + [("Answer: 3", "3", "numeric")] * 20
    with VerifierPool(num_workers=2, timeout_s=TIMEOUT_S, plugins=PLUGIN) as pool:
        t0 = time.monotonic()
        out = pool.score(*zip(*items))
        elapsed = time.monotonic() - t0
        assert [v.status for v in out[:4]] == ["timeout"] * 4
        assert all(v.reward == 1.0 for v in out[4:])
        assert elapsed <= math.ceil(4 / 2) * TIMEOUT_S + SLACK_S, elapsed
        assert pool.alive() == 4


@pytest.mark.parametrize("kind,status", [("exit", "crashed"), ("segfault", "crashed"), ("oom", "crashed"),
                                         ("raise", "error")])
def test_crashing_checks_cost_one_item(kind, status):
    items = [("Answer: 3", "3", "numeric")] * 5 + [("", "", kind)] * 3 + [("Answer: 3", "3", "numeric")] * 5
    with VerifierPool(num_workers=2, timeout_s=10.0, memory_mb=512, plugins=PLUGIN) as pool:
        out = pool.score(*zip(*items))
        assert [v.status for v in out[5:8]] == [status] * 3
        assert all(v.reward == 1.0 for v in out[:5] + out[8:])
        assert all(v.reward == 1.0 for v in pool.score(*zip(*items[:4])))


def test_workers_killed_from_outside_mid_batch():
    items = [("", "", "hang")] * 2 + [("Answer: 3", "3", "numeric")] * 30
    with VerifierPool(num_workers=2, timeout_s=30.0, plugins=PLUGIN) as pool:
        # score in a thread while this one kills both workers, each hung on an item
        future = concurrent.futures.ThreadPoolExecutor(max_workers=1).submit(pool.score, *zip(*items))
        deadline = time.monotonic() + 20
        while sum(w.job is not None for w in pool._workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        busy = [w for w in pool._workers if w.job is not None]
        assert len(busy) == 2
        for w in busy:
            os.kill(w.proc.pid, signal.SIGKILL)
        out = future.result(timeout=30)
        assert [v.status for v in out[:2]] == ["crashed"] * 2
        assert all(v.reward == 1.0 for v in out[2:])
        assert pool.alive() == 4


def test_score_returns_in_input_order_and_counts_statuses():
    items = [(f"Answer: {i}", str(i if i % 3 else -1), "numeric") for i in range(60)]
    with VerifierPool(num_workers=2) as pool:
        out = pool.score(*zip(*items))
        assert [v.reward for v in out] == [0.0 if i % 3 == 0 else 1.0 for i in range(60)]
        assert pool.counts["ok"] == 40 and pool.counts["wrong"] == 20
        with pytest.raises(ValueError):
            pool.score(["a"], [], [])
