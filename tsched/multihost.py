"""Several processes, one run: start-up, and the few points where the processes must agree or share.

A multi-host run (a TPU pod slice, or several local CPU processes in the tests) is one program per host
over one mesh of every host's devices (multi-controller JAX): every process runs the same steps on
global arrays and holds the rows of the batch assigned to it. What is not an array op goes through here:

- `initialize(mesh_cfg)`: `jax.distributed.initialize` before any other JAX work, from
  `mesh.num_processes` / `mesh.process_id` / `mesh.coordinator`; 0 / -1 / "" detect a Cloud TPU VM
  (JAX reads the slice's hosts from its metadata) and are one process elsewhere.
- `fetch`: host values of global arrays (a sharded array spans devices of other processes).
- `all_rows`: every process's host rows, concatenated in process order (prompts, scores, verdicts);
  `own_rows` the reverse: a process's block of rows that every process holds.
- `agree`: the processes' flags OR-ed (a signal or a timer seen by one process stops or saves all);
  `from_main`: process 0's decision where processes could read the file system differently.
- `is_main`: process 0 writes the run directory's logs, plots and summary; `barrier` and `main_first`
  order the rest.

With one process every function here is the identity (or plain `jax.device_get`): no collective runs.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def on_cloud_tpu_vm() -> bool:
    """A Cloud TPU VM: libtpu installed and TPU chips attached (or the worker variables GKE sets), where
    JAX finds the slice's coordinator and this host's index by itself."""
    chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or os.environ.get("TPU_WORKER_HOSTNAMES")
    return bool(chips) and importlib.util.find_spec("libtpu") is not None


_started = False  # whether `initialize` has decided already (a second call does nothing)


def initialize(mesh_cfg) -> None:
    """`jax.distributed.initialize` as `mesh.num_processes` / `process_id` / `coordinator` say; must run
    before anything asks JAX for its devices. Raises `ConfigError` naming the field for bad values.

    Detection (num_processes 0) joins a slice only while JAX has not started in this process: a notebook
    that already used JAX (Colab on a TPU) stays one process, as it must."""
    global _started
    from tsched.config import validate_processes

    validate_processes(mesh_cfg)
    n = mesh_cfg.get("num_processes", 0)
    decided, _started = _started, True
    if decided or jax.distributed.is_initialized() or n == 1 or (n == 0 and not on_cloud_tpu_vm()):
        return
    if n > 1:
        jax.distributed.initialize(mesh_cfg.coordinator, n, mesh_cfg.process_id)
        return
    from jax._src import xla_bridge  # no public test for it in jax 0.10 (pinned)

    if xla_bridge.backends_are_initialized():
        return
    try:  # Cloud TPU: coordinator, process count and index come from the VM's metadata
        jax.distributed.initialize()
    except ValueError as e:  # JAX found no slice to join (e.g. a Colab TPU): one process
        if "should be defined" not in str(e):
            raise


def is_main() -> bool:
    return jax.process_index() == 0


def fetch(tree):
    """Host (numpy) values of a pytree of arrays; arrays sharded over other processes' devices are
    all-gathered (every process gets the whole value)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    spans = lambda x: isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)) if spans(x) else jax.device_get(x),
                        tree)


def all_rows(tree):
    """Host arrays [n, ...] of this process -> [n x processes, ...], the processes' rows in process order."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def own_rows(tree):
    """Host arrays [N, ...] of all rows -> this process's block of them [N / processes, ...]."""
    n, p = jax.process_count(), jax.process_index()
    if n == 1:
        return tree
    return jax.tree.map(lambda x: x[p * (len(x) // n):(p + 1) * (len(x) // n)], tree)


def from_main(value: int) -> int:
    """Process 0's value in every process: one decision where each process could read the file system
    differently (a resume, a checkpoint that did or did not restore)."""
    if jax.process_count() == 1:
        return int(value)
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def agree(*flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over the processes: all of them take the same branch."""
    if jax.process_count() == 1:
        return tuple(bool(f) for f in flags)
    seen = multihost_utils.process_allgather(np.asarray(flags, np.int32))  # [processes, len(flags)]
    return tuple(bool(v) for v in np.asarray(seen).reshape(jax.process_count(), -1).any(axis=0))


def main_first(fn, name: str):
    """fn() in process 0, then in the others: process 0 fills the caches they may share (a dataset built on
    first use, a trained tokenizer) before they read them. If fn raises in process 0, the others wait
    until the distributed service notices that process 0 has gone, then fail."""
    if is_main():
        out = fn()
        barrier(name)
        return out
    barrier(name)
    return fn()


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (e.g. until process 0 prepared the run directory)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
