"""Orbax checkpoints of everything a resume needs: train state, RNG key and the data iterator state.

Saved per step as two items: `state` (params, optimizer state, step, rng key data; a pytree) and `data`
(the grain iterator state, JSON). Restoring uses the abstract tree of a freshly built state, so optimizer
state namedtuples come back as namedtuples and arrays land with the shardings of that tree.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, cleanup_tmp_directories=True,
                                               # Synchronous: the next step donates the state buffers.
                                               enable_async_checkpointing=False)
        # Orbax needs absolute paths; run_dir is usually relative to where the user launched (gs:// and
        # other object-store paths are absolute already).
        directory = str(directory)
        self.manager = ocp.CheckpointManager(directory if "://" in directory else os.path.abspath(directory),
                                             options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict | None = None) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, like_state, with_data: bool = True):
        """-> (state, data_state or None); `like_state` is a concrete or abstract tree of the same structure."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        items = {"state": ocp.args.StandardRestore(abstract)}
        if with_data:
            items["data"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], (out["data"] if with_data else None)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
