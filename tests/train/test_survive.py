"""Runs that survive (issue 16), end to end on a tiny config run as `python -m tsched.main` subprocesses.

One uninterrupted reference run per module; every other run starts from a copy of it or resumes a chain of
interrupted launches, and must end with the reference's parameters (bitwise), metrics log (timings aside)
and summary (wall time aside). All launches share one persistent compilation cache (tests.faults.env).
"""

import json
import os
import re
import shutil
import signal

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import faults
from tests.tiny import cli, tiny
from tsched.config import base_config
from tsched.train.checkpoint import complete_steps

pytestmark = pytest.mark.slow
ROOT = faults.ROOT
# data.train_size 160 with sft.batch_size 16: an epoch of the SFT iterator ends at steps 10 and 20, where
# checkpoints are written (train.checkpoint_every 2); a small evaluation keeps each launch short. The tiny
# policy earns no reward yet, so zero advantages would leave RL's parameters unchanged: an entropy bonus
# gives every RL step a non-zero update, which the bitwise comparisons then check.
FAULT = {"data.train_size": 160, "eval.num_problems": 8, "eval.batch_size": 8, "rl.entropy_coef": 0.01}


class Ref:
    pass


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    r = Ref()
    r.tmp = tmp_path_factory.mktemp("survive")
    r.cfg = tiny(base_config(), r.tmp, "reference", **{k.replace(".", "__"): v for k, v in FAULT.items()})
    r.env = faults.env(str(r.tmp / "jax-cache"))
    r.command = lambda name, **extra: cli(r.cfg, os.path.join(ROOT, "configs", "default.py"), run_dir=name,
                                          **FAULT, **{"train.resume": "auto", **extra})
    out = faults.launch(r.command("reference"), r.tmp, r.env)
    assert out.returncode == 0, out.stderr[-3000:]
    r.events, r.wall_s = out.events, out.wall_s
    assert ("sft_save_end", 10) in r.events and r.events[-1] == ("done", None)
    return r


def _params(run_dir, step=8):
    return ocp.StandardCheckpointer().restore(os.path.join(run_dir, "ckpt", "rl", str(step), "state"))


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _leaves(tree[k], f"{prefix}/{k}")]
    if isinstance(tree, (list, tuple)):
        return [x for i, v in enumerate(tree) for x in _leaves(v, f"{prefix}/{i}")]
    return [(prefix, np.asarray(tree))]


def assert_same_trees(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert [k for k, _ in la] == [k for k, _ in lb]
    for (k, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(x, y, err_msg=k)  # bitwise


def assert_same_as_reference(ref, name):
    run_dir = ref.tmp / name
    sft = ocp.StandardCheckpointer().restore(os.path.join(ref.cfg.run_dir, "ckpt", "sft", "20", "state"))["params"]
    assert not all(np.array_equal(x, y) for (_, x), (_, y) in zip(_leaves(sft), _leaves(_params(ref.cfg.run_dir)["params"])))
    assert_same_trees(_params(ref.cfg.run_dir), _params(run_dir))
    got, want = (faults.comparable_rows(os.path.join(d, "metrics.jsonl")) for d in (run_dir, ref.cfg.run_dir))
    assert [(r["phase"], r["step"]) for r in got] == [(r["phase"], r["step"]) for r in want]  # none missing or twice
    assert got == want
    summary = [json.load(open(os.path.join(d, "summary.json"))) for d in (run_dir, ref.cfg.run_dir)]
    for s in summary:
        s.pop("wall_time_s")
    assert summary[0] == summary[1]


def _index(ref, event):
    return ref.events.index(event)


def kill_moments(ref, seed=16):
    """10 seeded moments, one in each phase and two anywhere: setup, an SFT step, during an SFT save, right
    after the SFT epoch-boundary checkpoint, inside the evaluation before RL, an RL step, during an RL save,
    right after the last step's checkpoint, inside the evaluation after RL."""
    import random

    rng = random.Random(seed)
    by_name = lambda *names: [i for i, (n, _) in enumerate(ref.events) if n in names]
    picks = {
        rng.choice(by_name("start", "setup_done")): rng.uniform(0, 2.0),
        rng.choice(by_name("sft_step")): rng.uniform(0, 0.05),
        rng.choice(by_name("sft_save_start")): rng.uniform(0, 0.1),
        _index(ref, ("sft_save_end", 10)): 0.0,
        _index(ref, ("eval_before_start", None)): rng.uniform(0.2, 1.5),
        rng.choice(by_name("rl_step")): rng.uniform(0, 0.05),
        rng.choice(by_name("rl_save_start")): rng.uniform(0, 0.1),
        _index(ref, ("rl_save_end", 8)): 0.0,
        _index(ref, ("eval_after_start", None)): rng.uniform(0.1, 1.0),
    }
    while len(picks) < 10:
        picks.setdefault(rng.randrange(len(ref.events) - 1), rng.uniform(0, 0.3))
    return [faults.Moment(i, round(d, 3)) for i, d in sorted(picks.items())]


def run_chain(ref, name, moments, sig, check=None):
    """Launch, interrupt at each moment in turn (resuming each time; `check(moment, launch)` after each),
    then finish; -> the interrupted launches."""
    launches = []
    for m in moments:
        out = faults.launch(ref.command(name), ref.tmp, ref.env, ref.events, m, sig)
        assert out.returncode in (-sig, 143, 0), (m, out.returncode, out.stderr[-3000:])
        if check:
            check(m, out)
        launches.append((m, out))
    out = faults.launch(ref.command(name), ref.tmp, ref.env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == os.path.join(name, "summary.json")
    return launches


@pytest.mark.heavy
def test_sigkill_at_ten_moments_resumes_to_the_uninterrupted_result(ref):
    moments = kill_moments(ref)
    launches = run_chain(ref, "killed", moments, signal.SIGKILL)
    killed = [(ref.events[m.index], out.events[-1]) for m, out in launches if out.returncode == -signal.SIGKILL]
    assert len(killed) >= 8, killed  # (a kill right at the end may find the run finished)
    assert_same_as_reference(ref, "killed")


def test_sigterm_checkpoints_the_step_it_stopped_at_and_resumes(ref):
    import random

    rng = random.Random(143)
    by_name = lambda name: [i for i, (n, _) in enumerate(ref.events) if n == name]
    # The signal goes out as soon as the evaluation starts: a resumed launch reads its compiled programs from
    # the shared cache, so its evaluation can end sooner than any fixed delay measured on the reference.
    moments = [faults.Moment(rng.choice(by_name("sft_step")[:-2]), 0.0),
               faults.Moment(_index(ref, ("eval_before_start", None)), 0.0),
               faults.Moment(rng.choice(by_name("rl_step")[2:-1]), 0.0)]

    def check(m, out):
        assert out.returncode == 143, (m, out.stderr[-2000:])
        line = [ln for ln in out.stderr.splitlines() if ln.startswith("tsched: stopped by SIGTERM")]
        assert len(line) == 1 and "--config.train.resume=auto" in line[0], out.stderr[-2000:]
        stopped = re.search(r"after (SFT|RL) step (\d+)", line[0])
        phase = ref.events[m.index][0].split("_")[0]
        if phase == "eval":
            assert out.events[-1] == ("eval_before_start", None), out.events[-3:]
            assert "outside a training step" in line[0]
            return
        assert stopped and stopped.group(1).lower() == phase, line[0]
        step = int(stopped.group(2))
        last_step = [s for n, s in out.events if n == f"{phase}_step"][-1]
        assert step == last_step >= ref.events[m.index][1]
        assert step in complete_steps(str(ref.tmp / "terminated" / "ckpt" / phase))

    run_chain(ref, "terminated", moments, signal.SIGTERM, check)
    assert_same_as_reference(ref, "terminated")


def test_corrupt_latest_checkpoint_is_moved_aside_and_the_previous_one_used(ref):
    run_dir = ref.tmp / "corrupt"
    shutil.copytree(ref.cfg.run_dir, run_dir)
    os.remove(run_dir / "summary.json")
    for root, _, files in os.walk(run_dir / "ckpt" / "rl" / "8" / "state"):
        for f in files:
            os.truncate(os.path.join(root, f), os.path.getsize(os.path.join(root, f)) // 2)
    out = faults.launch(ref.command("corrupt"), ref.tmp, ref.env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"checkpoint \S+ckpt/rl/8 is unreadable .* moved it to \S+rl\.corrupt/8-", out.stderr)
    assert "resumed RL at step 6" in out.stdout
    assert os.listdir(run_dir / "ckpt" / "rl.corrupt")
    assert_same_as_reference(ref, "corrupt")


def test_a_run_dir_of_another_config_refuses_to_resume(ref):
    run_dir = ref.tmp / "mismatch"
    shutil.copytree(ref.cfg.run_dir, run_dir)
    before = sorted(os.listdir(run_dir))
    out = faults.launch(ref.command("mismatch", **{"model.d_model": 48, "train.progress": True}), ref.tmp, ref.env)
    assert out.returncode == 2
    err = [ln for ln in out.stderr.splitlines() if ln.startswith("tsched:")]
    assert len(err) == 1 and "model.d_model: 32 -> 48" in err[0] and "force_resume" in err[0], out.stderr[-2000:]
    assert "train.progress" not in err[0]
    assert sorted(os.listdir(run_dir)) == before


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(ref):
    """NaN rewards at RL step 3 (skipped, the run goes on) and at 5 and 6 (max_bad_steps=2: the run stops)."""
    run_dir = ref.tmp / "nan"
    shutil.copytree(ref.cfg.run_dir, run_dir)  # SFT and the evaluation before RL done; RL from scratch
    shutil.rmtree(run_dir / "ckpt" / "rl")
    command = ref.command("nan", **{"train.max_bad_steps": 2, "train.checkpoint_every": 1,
                                    "train.keep_checkpoints": 10})
    command[1:3] = [os.path.join(ROOT, "tests", "train", "nan_driver.py")]  # python <driver> <flags>
    out = faults.launch(command, ref.tmp, dict(ref.env, TSCHED_TEST_NAN_STEPS="3,5,6"))
    assert out.returncode == 3, out.stderr[-3000:]
    assert "2 non-finite RL steps in a row" in out.stderr and "ckpt/rl/6 holds the last good" in out.stderr
    assert complete_steps(str(run_dir / "ckpt" / "rl")) == [1, 2, 3, 4, 5, 6]
    state = {s: ocp.StandardCheckpointer().restore(str(run_dir / "ckpt" / "rl" / str(s) / "state"))
             for s in range(1, 7)}
    for a, b in ((2, 3), (4, 5), (4, 6)):  # a skipped step changes neither parameters nor optimizer state
        assert_same_trees({k: state[a][k] for k in ("params", "opt_state")},
                          {k: state[b][k] for k in ("params", "opt_state")})
        assert int(state[b]["step"]) == b  # ... but advances the step counter
    assert not all(np.array_equal(x, y) for (_, x), (_, y) in zip(_leaves(state[3]["params"]),
                                                                  _leaves(state[4]["params"])))  # 4 was not
    rows = [r for r in faults.comparable_rows(str(run_dir / "metrics.jsonl")) if r["phase"] == "rl"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped"] for r in rows] == [0, 0, 1, 0, 1, 1]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 2, 3]
    # steps 1 and 2 are the reference's
    want = [r for r in faults.comparable_rows(os.path.join(ref.cfg.run_dir, "metrics.jsonl")) if r["phase"] == "rl"]
    assert rows[:2] == want[:2]
