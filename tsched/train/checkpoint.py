"""Orbax checkpoints of everything a resume needs: train state, RNG key and the data iterator state.

Saved per step as two items: `state` (params, optimizer state, step, rng key data; a pytree) and `data`
(the grain iterator state, JSON). Restoring uses the abstract tree of a freshly built state, so optimizer
state namedtuples come back as namedtuples and arrays land with the shardings of that tree.

What survives what:
- A save killed or failing half-way (SIGKILL, full disk, unwritable directory): Orbax writes a step into
  `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so an unfinished step never carries a
  plain step name; `complete_steps` also requires the metadata files of a finished save. A failed save
  raises `CheckpointError` naming the path; the previous checkpoints are untouched (Orbax deletes old
  steps only after a successful save).
- Several processes (multi-host): every process saves and restores its shards of the global arrays; the
  data item is written once (each process's iterator state is the same position, see
  `tsched.data.pipeline.train_batches`).
- A truncated or corrupt step: `restore_latest` reports it, moves it aside (to
  `<directory>.corrupt/<step>-<time>`, never deleted) and falls back to the step before it.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import orbax.checkpoint as ocp
from etils import epath

from tsched import multihost


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names the path."""


def complete_steps(directory) -> list[int]:
    """The steps under `directory` whose save finished (sorted); reads only directory listings, creates nothing.

    Incomplete saves are Orbax's temporary directories (`<step>.orbax-checkpoint-tmp-*`, never a plain
    number) or, on file systems without atomic rename, step directories lacking the metadata Orbax writes
    last."""
    directory = epath.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").is_file() and (p / "state" / "_METADATA").is_file())


def restore_params(path):
    """The parameters of the train state saved at `path` (a step's item directory, e.g.
    `<run>/ckpt/rl/8/state`), on this process's first device, whatever mesh and processes saved it
    (Orbax otherwise restores onto the saving topology, and refuses another). The optimizer state is not
    read."""
    meta = ocp.StandardCheckpointer().metadata(path).item_metadata
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    item = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                                   getattr(meta, "tree", meta)["params"])}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    return ocp.PyTreeCheckpointer().restore(path, args=args)["params"]


class Checkpointer:
    def __init__(self, directory, keep: int = 2, read_only: bool = False):
        """read_only: only restore, and change nothing in `directory` (another run's checkpoints)."""
        # Orbax needs absolute paths; run_dir is usually relative to where the user launched (gs:// and
        # other object-store paths are absolute already).
        directory = str(directory)
        self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep,
                                               cleanup_tmp_directories=not read_only,
                                               read_only=read_only, create=not read_only,
                                               # Synchronous: the next step donates the state buffers.
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        steps = complete_steps(self.directory)
        return steps[-1] if steps else None

    def save(self, step: int, state, data_state: dict | None = None) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
        path = self.directory / str(step)
        error = None
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - full disk, permissions, ... all end the run the same way
            error = e
        # Every process stops or none does: a failure in one process, or a step process 0 does not find
        # complete, is everyone's.
        incomplete = error is None and multihost.is_main() and step not in complete_steps(self.directory)
        if any(multihost.agree(error is not None, incomplete)):
            why = (f"{type(error).__name__}: {error}" if error else "the save returned but left no complete step"
                   if incomplete else "it failed in another process")
            raise CheckpointError(f"could not write checkpoint {path}: {why}; the previous checkpoint "
                                  f"({self.latest_step()}) is intact") from error

    def restore(self, step: int, like_state, with_data: bool = True):
        """-> (state, data_state or None); `like_state` is a concrete or abstract tree of the same structure."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        items = {"state": ocp.args.StandardRestore(abstract)}
        if with_data:
            items["data"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        if "step" in out["state"] and int(out["state"]["step"]) != step:
            raise ValueError(f"the state in checkpoint {step} has step counter {int(out['state']['step'])}")
        return out["state"], (out["data"] if with_data else None)

    def restore_latest(self, like_state, with_data: bool = True):
        """-> (step, state, data_state) of the newest step that restores, or None if none does.

        A step that fails to restore is reported on stderr and moved aside, and the one before is tried.
        With several processes, process 0's listing names the step, and a step that fails in any process
        is moved aside for all."""
        while (step := multihost.from_main(-1 if (latest := self.latest_step()) is None else latest)) >= 0:
            error = None
            try:
                restored = (step, *self.restore(step, like_state, with_data))
            except Exception as e:  # noqa: BLE001 - any failure to read a step means it cannot be used
                error = e
            if not multihost.agree(error is not None)[0]:
                return restored
            bad = self.directory / str(step)
            if multihost.is_main():  # the other processes wait until it is gone
                aside = self.directory.parent / f"{self.directory.name}.corrupt" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                aside.parent.mkdir(parents=True, exist_ok=True)
                bad.rename(aside)
                why = (f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}" if error
                       else "in another process")
                print(f"tsched: checkpoint {bad} is unreadable ({why}); moved it to {aside} and trying the previous "
                      f"one", file=sys.stderr, flush=True)
            multihost.barrier(f"checkpoint_{step}_aside")
            self.manager.reload()
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
