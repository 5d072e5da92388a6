"""Device mesh ('data', 'fsdp', 'tensor') from the config, and logical-to-mesh axis rules.

Parameters are sharded by their logical axis names (see tsched.model): the embedding dimension over
'fsdp', heads / mlp / vocab over 'tensor'. Batches are sharded over ('data', 'fsdp'). On one CPU
device every axis has size 1 and all of this reduces to plain single-device jit.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

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


def logical_to_sharding(logical_specs, mesh: Mesh):
    """Pytree of logical PartitionSpecs -> pytree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, RULES)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def colocate(tree, like):
    """`tree` with every leaf that is not on the mesh of `like` (a placed pytree such as the parameters)
    replicated over that mesh; `tree` unchanged when `like` is not on a mesh.

    Scalars made outside jit (a step counter, a key, optimizer counts) sit on one device, while a jitted
    step returns them on the mesh: left so, the step compiles twice, for its first call and the rest."""
    placed = [x.sharding for x in jax.tree.leaves(like) if not isinstance(x, jax.core.Tracer)]
    mesh = next((s.mesh for s in placed if isinstance(s, NamedSharding)), None)
    if mesh is None:  # not on a mesh, or inside a trace (where jit places the outputs)
        return tree
    on_mesh = lambda x: isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
    return jax.tree.map(lambda x: x if on_mesh(x) else jax.device_put(x, replicated(mesh)), tree)
