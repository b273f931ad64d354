"""Device mesh with a data axis and an fsdp axis, and FSDP placement of params."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(data: int = 0, fsdp: int = 1) -> Mesh:
    """Mesh of shape (data, fsdp) over the first data * fsdp devices; data=0 takes
    all devices that fsdp leaves."""
    n = jax.device_count()
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"fsdp ({fsdp}) must divide the device count ({n})")
    data = data or n // fsdp
    if data * fsdp > n:
        raise ValueError(f"data ({data}) x fsdp ({fsdp}) exceeds the device count ({n})")
    return Mesh(np.asarray(jax.devices()[: data * fsdp]).reshape(data, fsdp), ("data", "fsdp"))


def fsdp_specs(params, mesh: Mesh):
    """NamedShardings that split each matrix along its largest dim divisible by
    the fsdp axis size (replicated otherwise, and for vectors)."""
    size = mesh.shape["fsdp"]

    def spec(x):
        dims = sorted(range(x.ndim), key=lambda d: -x.shape[d])
        for d in dims:
            if x.ndim >= 2 and size > 1 and x.shape[d] % size == 0:
                parts = [None] * x.ndim
                parts[d] = "fsdp"
                return NamedSharding(mesh, P(*parts))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map(spec, params)
