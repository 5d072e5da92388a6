"""Device mesh ('data', 'fsdp', 'tensor') from the config, and logical-to-mesh axis rules.

Parameters are sharded by their logical axis names (see tsched.model): the embedding dimension over
'fsdp', heads / mlp / vocab over 'tensor'. Batches are sharded over ('data', 'fsdp'). On one CPU
device every axis has size 1 and all of this reduces to plain single-device jit.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from tsched import multihost

AXES = ("data", "fsdp", "tensor")
RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 (at most one) to the devices left; the product must equal `num_devices`."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"config fields 'mesh.*' = {sizes}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"config fields 'mesh.*' = {sizes}: {num_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config fields 'mesh.*' = {sizes}: product must equal the {num_devices} devices")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    # Auto axes: GSPMD propagates shardings from the explicit in/out shardings we give jit.
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_sharding(logical_specs, mesh: Mesh, rules=RULES):
    """Pytree of logical PartitionSpecs -> pytree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


BATCH = ("data", "fsdp")  # the mesh axes the leading (row) axis of every batch array is split over


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis over ('data', 'fsdp'), the rest replicated (as a jit in/out sharding it is a
    pytree prefix: it applies to arrays of any rank)."""
    return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def mesh_of(tree) -> Mesh | None:
    """The mesh the placed leaves of `tree` live on, or None (not on a mesh, or inside a trace)."""
    placed = [x.sharding for x in jax.tree.leaves(tree) if not isinstance(x, jax.core.Tracer)]
    return next((s.mesh for s in placed if isinstance(s, NamedSharding)), None)


def constrain(x, mesh: Mesh | None, *spec):
    """`x` pinned to PartitionSpec(*spec) on `mesh` inside a jitted function; unchanged without a mesh."""
    return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


# Decoding reads every weight once per token for a few rows: the sampler keeps its copy of the weights
# tensor-parallel over ('fsdp', 'tensor') (no per-token all-gathers) and splits rows over 'data' only.
DECODE_ROWS = ("data",)
DECODE_RULES = tuple((name, None if name == "embed" else (("fsdp", "tensor") if axes else None))
                     for name, axes in RULES if name != "batch")
_row_axes = contextvars.ContextVar("row_axes", default=BATCH)


@contextlib.contextmanager
def decode_layout():
    """While tracing the sampler: `pin_rows` splits rows over DECODE_ROWS."""
    token = _row_axes.set(DECODE_ROWS)
    try:
        yield
    finally:
        _row_axes.reset(token)


def traced_in(context):
    """Decorator: a jitted function whose calls (and `.lower`, where it traces) run inside `context()`."""
    def wrap(jitted):
        @functools.wraps(jitted)
        def call(*args, **kwargs):
            with context():
                return jitted(*args, **kwargs)

        def lower(*args, **kwargs):
            with context():
                return jitted.lower(*args, **kwargs)

        call.lower = lower
        return call

    return wrap


def pin_rows(x):
    """Inside a function traced under `jax.set_mesh(mesh)`: the residual stream x [rows, T, D] with its
    rows split over the batch axes and, in full passes, its positions over 'tensor' (sequence
    parallelism: the residuals that rematerialisation keeps per layer are split like everything else);
    inside `decode_layout`, rows over DECODE_ROWS only. Left to propagation, the update's temporaries for
    Qwen3-4B on 8 TPU chips grew with the rows of a whole micro-batch (about 2.9 GiB per row, 28 GiB at 8
    rows), as if every chip held every row; pinned, 11 GiB (tsched.plan). No-op off a mesh."""
    mesh, axes = jax.sharding.get_abstract_mesh(), _row_axes.get()
    if mesh.empty or not set(axes) <= set(mesh.axis_names):
        return x
    positions = "tensor" if axes == BATCH and x.ndim == 3 else None
    return jax.lax.with_sharding_constraint(x, P(axes, positions))


def row_shards() -> int:
    """Into how many parts the batch axes split rows in a function traced under `jax.set_mesh(mesh)`; 1
    off a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    sizes = {} if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes))
    return math.prod(sizes.get(a, 1) for a in BATCH)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def colocate(tree, like):
    """`tree` with every leaf that is not on the mesh of `like` (a placed pytree such as the parameters)
    replicated over that mesh; `tree` unchanged when `like` is not on a mesh.

    Scalars made outside jit (a step counter, a key, optimizer counts) sit on one device, while a jitted
    step returns them on the mesh: left so, the step compiles twice, for its first call and the rest."""
    mesh = mesh_of(like)
    if mesh is None:  # not on a mesh, or inside a trace (where jit places the outputs)
        return tree
    on_mesh = lambda x: isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
    return jax.tree.map(lambda x: x if on_mesh(x) else jax.device_put(x, replicated(mesh)), tree)


def place_batch(tree, mesh: Mesh):
    """Batch arrays -> global arrays with their rows split over the batch axes of `mesh`.

    Host (numpy) arrays hold this process's rows: with one process all rows; with several (multi-host)
    process i holds rows i * n .. (i + 1) * n - 1 and the global leading size is n x process count.
    Where the mesh gives every process exactly the rows it holds (the batch axes span the processes, as
    `make_mesh` orders devices), `jax.make_array_from_process_local_data` places them and no process
    sees another's rows; otherwise (e.g. rows replicated over a tensor-parallel mesh) the processes'
    rows are all-gathered first. JAX arrays (e.g. the sampler's tokens) are already global and are moved
    to the batch sharding."""
    def put(x):
        if isinstance(x, jax.Array):
            return jax.device_put(x, batch_sharding(mesh, x.ndim))
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        if _rows_follow_processes(sharding, shape):
            return jax.make_array_from_process_local_data(sharding, x, shape)
        return place_whole(multihost.all_rows(x), sharding)

    return jax.tree.map(put, tree)


def _rows_follow_processes(sharding: NamedSharding, shape) -> bool:
    """Whether every device's rows lie in its process's block of rows (the same answer in every process:
    it reads the global device map, so all processes take the same branch of `place_batch`)."""
    per = shape[0] // jax.process_count()
    return all(d.process_index * per <= start and stop <= (d.process_index + 1) * per
               for d, index in sharding.devices_indices_map(shape).items()
               for start, stop, _ in [index[0].indices(shape[0])])


def place_whole(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array every process holds whole -> a global array (each process places its devices' parts)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
