"""Serving over a device mesh: the generation mesh and one engine step under jax.shard_map.

The mesh has two named axes:

  data   the sequences of a call: each shard holds B / data of them (their cache
         rows, policy state and tokens);
  model  the heads: query heads and the KV heads of the weights and the cache, the
         MLP's F and the LM head's V (models.loading.param_partition_specs). One
         KV head (MQA) is kept whole on every model shard, its query heads split.

Under a mesh (EngineConfig.mesh) each engine step, forward, policy and cache
update (engine._run_rows), runs inside jax.shard_map on each shard's local
slice, the Pallas kernels included; the forward sums the partial products of wo
and w_down and the attention mass over the model axis and gathers the logits
(models.llama.forward's model_axis). Every model shard then holds the same
residual stream, mass and logits, so a policy's decisions (ADORE's controller,
one per sequence) are the same on every shard: they release the same slots.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from models.cache import KVCache, QuantSlots
from models.llama import LlamaConfig, Params
from models.loading import param_partition_specs

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)


def parse_mesh(text: str) -> dict[str, int]:
    """Axis sizes of "data=2,model=4" ({"data": 2, "model": 4}; an axis left out is 1)."""
    sizes = {DATA: 1, MODEL: 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in AXES or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"mesh must read like data=2,model=4 (axes {', '.join(AXES)}, sizes >= 1), got {text!r}")
        sizes[name.strip()] = int(value)
    return sizes


def make_mesh(shape: Union[str, Mapping[str, int]], devices: Optional[Sequence] = None) -> Mesh:
    """A generation mesh (data, model) over the first data * model of `devices`
    (default: jax.local_devices()). shape: "data=2,model=4" or {"data": 2, "model": 4}."""
    sizes = parse_mesh(shape) if isinstance(shape, str) else {DATA: 1, MODEL: 1, **shape}
    devices = list(jax.local_devices() if devices is None else devices)
    n = sizes[DATA] * sizes[MODEL]
    if set(sizes) != set(AXES):
        raise ValueError(f"mesh axes are {', '.join(AXES)}, got {', '.join(sizes)}")
    if n > len(devices):
        raise ValueError(f"mesh data={sizes[DATA]},model={sizes[MODEL]} needs {n} devices, {len(devices)} are here")
    return Mesh(np.asarray(devices[:n]).reshape(sizes[DATA], sizes[MODEL]), AXES)


def default_mesh(batch: int, devices: Optional[Sequence] = None) -> Optional[Mesh]:
    """Every local device on the data axis when there are several and they divide
    the batch of `batch` sequences; else None (one device, no mesh)."""
    devices = list(jax.local_devices() if devices is None else devices)
    n = len(devices)
    return make_mesh({DATA: n}, devices) if n > 1 and batch % n == 0 else None


def check_mesh(mesh: Mesh, cfg: LlamaConfig, batch: int, prefill_batch: Optional[int] = None) -> None:
    """Raise ValueError unless `batch` sequences (prefilled `prefill_batch` at a
    time) and cfg's heads split over the mesh: data divides the batch, model
    divides the query heads and the KV heads (or there is one KV head)."""
    if tuple(mesh.axis_names) != AXES:
        raise ValueError(f"a generation mesh has axes {AXES} (adore_jax.sharding.make_mesh), got {mesh.axis_names}")
    d, m = mesh.shape[DATA], mesh.shape[MODEL]
    for what, n in (("batch", batch), ("prefill group", prefill_batch or batch)):
        if n % d:
            raise ValueError(f"the {what} of {n} sequences is not a multiple of the mesh's data axis ({d})")
    if cfg.num_heads % m:
        raise ValueError(f"the model's {cfg.num_heads} query heads do not split over the mesh's model axis ({m})")
    if cfg.num_kv_heads % m and cfg.num_kv_heads != 1:
        raise ValueError(f"the model's {cfg.num_kv_heads} KV heads do not split over the mesh's model axis ({m}); "
                         "use a model axis that divides them")


def cache_specs(cfg: LlamaConfig, mesh: Mesh, quantized: bool = False) -> KVCache:
    """PartitionSpecs of the cache: k, v [L, B, S, Hkv, D] split over data (B) and
    model (Hkv; one KV head: whole on every shard); pos [B, S] over data. With
    quantized (8-bit slots), k and v are QuantSlots whose scales [L, B, S, Hkv]
    split as the values do."""
    kv = MODEL if cfg.num_kv_heads % mesh.shape[MODEL] == 0 else None
    rows = P(None, DATA, None, kv, None)
    if quantized:
        rows = QuantSlots(rows, P(None, DATA, None, kv))
    return KVCache(rows, rows, P(DATA, None))


def param_specs(cfg: LlamaConfig, params: Params, mesh: Mesh) -> Params:
    """PartitionSpecs of the weights over the model axis (models.loading.param_partition_specs)."""
    return param_partition_specs(cfg, params, MODEL, mesh.shape[MODEL])


def batch_specs(tree: Any, batch: int) -> Any:
    """PartitionSpecs of a policy state: leaves [B, ...] over data, the others (a step count) whole."""
    return jax.tree.map(lambda x: P(DATA) if x.ndim and x.shape[0] == batch else P(), tree)


def shard_step(fn: Callable, mesh: Mesh, cfg: LlamaConfig, params: Params, pp, cache: KVCache, pstate, *rows):
    """fn(params, pp, cache, pstate, *rows) -> (logits [B, R, V], cache, pstate), run
    under jax.shard_map on each shard's slice: rows [B, T] and the state split over
    data, weights and cache as `param_specs` and `cache_specs`, the policy's params
    whole. fn sees B / data sequences and its shard's heads."""
    B = cache.pos.shape[0]
    cs, ss = cache_specs(cfg, mesh, cache.quantized), batch_specs(pstate, B)
    in_specs = (param_specs(cfg, params, mesh), P(), cs, ss, *(P(DATA),) * len(rows))
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=(P(DATA), cs, ss), check_vma=False)(
        params, pp, cache, pstate, *rows)
