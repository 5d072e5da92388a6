"""`python tests/train/nan_driver.py <tsched.main flags>`: tsched.main with the rewards of the RL steps listed
in TSCHED_TEST_NAN_STEPS (comma-separated) replaced by NaN, so those steps' loss and gradients are not
finite. Test-only: the injection is a monkeypatch in this process, not a knob of the package."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tsched.train import learner  # noqa: E402

BAD = {int(s) for s in os.environ["TSCHED_TEST_NAN_STEPS"].split(",")}
_make_rl_step = learner.make_rl_step


def make_rl_step(cfg, model_cfg, tx, mesh=None):
    step_fn = _make_rl_step(cfg, model_cfg, tx, mesh)

    def poisoned(state, ref_params, batch):
        if int(state["step"]) + 1 in BAD:
            batch = {**batch, "rewards": np.full(np.shape(batch["rewards"]), np.nan, np.float32)}
        return step_fn(state, ref_params, batch)

    return poisoned


learner.make_rl_step = make_rl_step

if __name__ == "__main__":
    from absl import app

    from tsched import main

    app.run(main.main, flags_parser=main.parse_flags)
