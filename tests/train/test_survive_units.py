"""Fast checks of the pieces that make runs survive: resume modes, the config-mismatch check, complete-step
detection, corrupt-step fallback, failed saves (a full tmpfs when we may mount one, else a read-only
directory or a simulated write failure), and the non-finite step guard."""

import errno
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tsched.config import ConfigError, base_config, resume_mode, validate
from tsched.train import learner, trainer
from tsched.train.checkpoint import CheckpointError, Checkpointer, complete_steps


@pytest.mark.parametrize("value, mode", [("never", "never"), ("auto", "auto"), ("always", "always"),
                                         ("True", "auto"), ("true", "auto"), ("False", "never"), ("AUTO", "auto")])
def test_resume_spellings(value, mode):
    cfg = base_config()
    cfg.train.resume = value
    assert resume_mode(cfg) == mode


def test_bad_resume_value_names_the_field():
    cfg = base_config()
    cfg.train.resume = "sometimes"
    with pytest.raises(ConfigError, match="train.resume"):
        validate(cfg, num_devices=1)


def _fake_checkpoint(directory, step):
    os.makedirs(os.path.join(directory, str(step), "state"))
    for name in ("_CHECKPOINT_METADATA", "state/_METADATA"):
        open(os.path.join(directory, str(step), name), "w").close()


def _run_dir_with_checkpoint(tmp_path):
    cfg = base_config()
    cfg.run_dir = str(tmp_path / "run")
    os.makedirs(cfg.run_dir)
    with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))
    _fake_checkpoint(os.path.join(cfg.run_dir, "ckpt", "rl"), 4)
    cfg.train.resume = "auto"
    return cfg


def test_resume_refuses_a_run_dir_of_another_config(tmp_path):
    cfg = _run_dir_with_checkpoint(tmp_path)
    cfg.model.d_model = 64
    cfg.rl.clip_high = 0.3
    with pytest.raises(ConfigError, match=r"model.d_model: 128 -> 64.*rl.clip_high: 0.28 -> 0.3.*force_resume"):
        trainer._resolve_resume(cfg)
    cfg.train.force_resume = True
    assert trainer._resolve_resume(cfg)


def test_resume_ignores_fields_that_do_not_change_the_result(tmp_path):
    cfg = _run_dir_with_checkpoint(tmp_path)
    cfg.train.progress, cfg.train.checkpoint_every, cfg.train.checkpoint_every_s = False, 7, 60.0
    cfg.verify.num_workers, cfg.data.data_dir = 5, str(tmp_path / "elsewhere")
    assert trainer._resolve_resume(cfg)


def test_resume_modes_without_a_checkpoint(tmp_path):
    cfg = base_config()
    cfg.run_dir = str(tmp_path / "empty")
    os.makedirs(os.path.join(cfg.run_dir, "ckpt", "rl", "3.orbax-checkpoint-tmp-17"))  # a save that never finished
    cfg.train.resume = "auto"
    assert not trainer._resolve_resume(cfg)  # starts afresh
    cfg.train.resume = "always"
    with pytest.raises(ConfigError, match="train.resume.*no checkpoint"):
        trainer._resolve_resume(cfg)


def test_complete_steps_ignores_unfinished_saves(tmp_path):
    d = str(tmp_path)
    _fake_checkpoint(d, 2)
    os.makedirs(os.path.join(d, "4.orbax-checkpoint-tmp-1700000000"))  # Orbax's in-progress name
    os.makedirs(os.path.join(d, "6", "state"))  # no metadata: not finished
    assert complete_steps(d) == [2]


def _state(seed=0):
    return {"params": {"w": jnp.full((64, 64), float(seed))}, "step": jnp.int32(seed)}


def test_corrupt_latest_checkpoint_is_moved_aside_and_the_previous_used(tmp_path, capsys):
    ckpt = Checkpointer(str(tmp_path / "rl"), keep=3)
    ckpt.save(1, _state(1), {"iterator": 1})
    ckpt.save(2, _state(2), {"iterator": 2})
    for root, _, files in os.walk(tmp_path / "rl" / "2" / "state"):
        for name in files:
            path = os.path.join(root, name)
            os.truncate(path, os.path.getsize(path) // 2)
    step, state, data = ckpt.restore_latest(_state())
    assert step == 1 and float(state["params"]["w"][0, 0]) == 1.0 and data == {"iterator": 1}
    assert "rl/2 is unreadable" in capsys.readouterr().err
    assert complete_steps(str(tmp_path / "rl")) == [1]
    assert [n.split("-")[0] for n in os.listdir(tmp_path / "rl.corrupt")] == ["2"]  # moved, not deleted
    ckpt.save(2, _state(2), {"iterator": 2})  # the run goes on saving
    assert complete_steps(str(tmp_path / "rl")) == [1, 2]
    ckpt.close()


def test_a_read_only_checkpointer_restores_and_changes_nothing(tmp_path):
    """How a run reads another run's SFT (sft.warm_start): that run's in-progress saves are left alone."""
    ckpt = Checkpointer(str(tmp_path / "sft"), keep=1)
    ckpt.save(3, _state(3), {"iterator": 3})
    ckpt.close()
    os.makedirs(tmp_path / "sft" / "4.orbax-checkpoint-tmp-1700000000")  # what a writer cleans up on start
    listing = sorted(os.walk(tmp_path))
    reader = Checkpointer(str(tmp_path / "sft"), read_only=True)
    state, data = reader.restore(3, _state())
    reader.close()
    assert float(state["params"]["w"][0, 0]) == 3.0 and int(state["step"]) == 3 and data == {"iterator": 3}
    assert sorted(os.walk(tmp_path)) == listing
    assert Checkpointer(str(tmp_path / "nothing"), read_only=True).latest_step() is None
    assert not os.path.exists(tmp_path / "nothing")


def _mount_tmpfs(path, size):
    os.makedirs(path)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_failed_save_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "2m")
    try:
        ckpt = Checkpointer(str(disk / "rl"), keep=2)
        ckpt.save(1, _state(1), {"iterator": 1})
        if mounted:  # a real full disk
            with open(disk / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError as e:
                    assert e.errno == errno.ENOSPC
        elif os.geteuid() != 0:  # an unwritable directory
            os.chmod(disk / "rl", 0o555)
        else:  # root without mount: the write fails as on a full disk
            def no_space(*a, **k):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(ckpt.manager, "save", no_space)
        with pytest.raises(CheckpointError, match=f"{disk / 'rl' / '2'}.*previous checkpoint \\(1\\) is intact"):
            ckpt.save(2, _state(2), {"iterator": 2})
        assert trainer.exit_status(CheckpointError("x")) == trainer.EXIT_CHECKPOINT
        assert complete_steps(str(disk / "rl")) == [1]
        assert "2" not in os.listdir(disk / "rl")
        if mounted:
            os.remove(disk / "filler")
        os.chmod(disk / "rl", 0o755)
        step, state, _ = Checkpointer(str(disk / "rl")).restore_latest(_state())
        assert step == 1 and float(state["params"]["w"][0, 0]) == 1.0
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)


def test_a_non_finite_step_keeps_params_and_optimizer_state_but_advances_the_step():
    tx = learner.make_optimizer(1e-2, 1.0)
    state = learner.init_state({"w": jnp.ones(3)}, tx)

    @jax.jit
    def step(state, scale):
        loss, grads = jax.value_and_grad(lambda p: scale * jnp.sum(p["w"] ** 2))(state["params"])
        new = learner._apply(tx, state, grads)
        return learner.skip_if_not_finite(state, new, {"loss": loss, "grad_norm": optax.global_norm(grads)})

    good, m = step(state, 1.0)
    assert float(m["skipped"]) == 0.0 and not np.allclose(good["params"]["w"], 1.0)
    bad, m = step(good, jnp.nan)
    assert float(m["skipped"]) == 1.0 and int(bad["step"]) == 2
    for a, b in zip(jax.tree.leaves((good["params"], good["opt_state"])), jax.tree.leaves((bad["params"], bad["opt_state"]))):
        np.testing.assert_array_equal(a, b)


class _FakeCheckpointer:
    directory = "ckpt/rl"

    def __init__(self):
        self.saved = []

    def save(self, step, state, data_state=None):
        self.saved.append((step, data_state))


class _FakeIterator:
    def get_state(self):
        return {"pos": 1}


def _saver(**train):
    cfg = base_config()
    for k, v in train.items():
        cfg.train[k] = v
    return trainer._Saver(cfg, "rl", 10, _FakeCheckpointer(), trainer._Signals())


def test_saver_checkpoints_by_steps_by_time_and_at_the_last_step():
    import time

    saver = _saver(checkpoint_every=4, checkpoint_every_s=0.0)
    for step in range(1, 11):
        saver.end_of_step(step, {}, _FakeIterator())
    assert [s for s, _ in saver.ckpt.saved] == [4, 8, 10]
    saver = _saver(checkpoint_every=100, checkpoint_every_s=0.05)
    saver.end_of_step(1, {}, _FakeIterator())
    time.sleep(0.06)
    saver.end_of_step(2, {}, _FakeIterator())
    assert [s for s, _ in saver.ckpt.saved] == [2]


def test_saver_stops_on_a_signal_and_on_too_many_bad_steps_with_a_checkpoint():
    saver = _saver(checkpoint_every=100)
    saver.signals.received = "SIGTERM"
    with pytest.raises(trainer.Preempted, match="after RL step 3; checkpoint ckpt/rl/3 written.*resume=auto"):
        saver.end_of_step(3, {}, _FakeIterator())
    assert [s for s, _ in saver.ckpt.saved] == [3]
    assert trainer.exit_status(trainer.Preempted("x")) == 143

    saver = _saver(checkpoint_every=100, max_bad_steps=2)
    for step, skipped in ((1, 1.0), (2, 0.0), (3, 1.0)):
        saver.count(skipped)
        saver.end_of_step(step, {}, _FakeIterator())
    saver.count(1.0)
    with pytest.raises(trainer.TooManyBadSteps, match="2 non-finite RL steps in a row"):
        saver.end_of_step(4, {}, _FakeIterator())
    assert saver.ckpt.saved == [(4, {"iterator": {"pos": 1}, "skipped_steps": 3, "bad_in_a_row": 2})]
    assert trainer.exit_status(trainer.TooManyBadSteps("x")) == trainer.EXIT_BAD_STEPS
