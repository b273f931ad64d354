"""In-place cache update: write the new rows of every layer into chosen slots.

Same contract as the reference `models.cache.write_rows(cache, new_k,
new_v, slots, positions)`: new_k/new_v [L, B, T, Hkv, D], slots [B, T] (-1 or
out of range: the row is dropped), positions [B, T]. Two rows must not target
one slot. The cache buffers are aliased to the outputs (input_output_aliases),
so under a jit that donates the cache nothing but the written rows moves.
An 8-bit cache (models.cache.QuantSlots) is written quantized: values and
per-slot-per-head scales (GPU kernel; the TPU one takes plain caches only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.experimental.pallas import tpu as pltpu

from adore_jax.kernels.common import cdiv, default_interpret_params, next_pow2
from models.cache import KVCache, QuantSlots, quantize


def _check(cache: KVCache, new_k, new_v, slots, positions):
    L, B, S, Hkv, D = cache.k.shape
    if new_k.ndim != 5 or new_k.shape[:2] != (L, B) or new_k.shape[3:] != (Hkv, D) or new_v.shape != new_k.shape:
        raise ValueError(f"new_k/new_v must be [{L}, {B}, T, {Hkv}, {D}]; got {new_k.shape}, {new_v.shape}")
    T = new_k.shape[2]
    if slots.shape != (B, T) or positions.shape != (B, T):
        raise ValueError(f"slots/positions must be [{B}, {T}]; got {slots.shape}, {positions.shape}")
    return L, B, S, Hkv, D, T


def _rows(cache_part, new):
    """The (cache, new rows) pairs one K or V write moves, each as [L, B, rows, width]:
    a plain cache's rows, or an 8-bit cache's values and scales (the new rows
    quantized here, in XLA: T rows per layer)."""
    flat = lambda a: a.reshape(*a.shape[:3], -1)
    if isinstance(cache_part, QuantSlots):
        qn = quantize(new, cache_part.values.dtype)
        return [(flat(cache_part.values), flat(qn.values)), (flat(cache_part.scale), flat(qn.scale))]
    return [(flat(cache_part), flat(new))]


def _as_cache(like, outs):
    """K or V of the cache's structure from the written [L, B, S, width] arrays."""
    if isinstance(like, QuantSlots):
        return QuantSlots(outs[0].reshape(like.values.shape), outs[1].reshape(like.scale.shape))
    return outs[0].reshape(like.shape)


# ---------------------------------------------------------------- GPU (Triton)


def _gpu_kernel(slots_ref, posv_ref, *refs, S, widths):
    n = len(widths)
    new_refs, out_refs, pos_ref = refs[:n], refs[2 * n + 1 : 3 * n + 1], refs[-1]  # cache inputs: aliased
    l = pl.program_id(0)
    t = pl.program_id(2)
    slot = slots_ref[t]
    ok = (slot >= 0) & (slot < S)
    slot_w = jnp.where(ok, slot, S)  # out of range when dropped: masked on GPU, dropped in interpret
    for new_ref, out_ref, W in zip(new_refs, out_refs, widths):
        C = min(next_pow2(W), 2048)
        for c0 in range(0, W, C):
            cols = c0 + jnp.arange(C, dtype=jnp.int32)
            row = plgpu.load(new_ref.at[t, cols], mask=cols < W)  # no fill value: masked columns are not stored
            plgpu.store(out_ref.at[slot_w, cols], row.astype(out_ref.dtype), mask=(cols < W) & ok)
    plgpu.store(pos_ref.at[slot_w], posv_ref[t], mask=ok & (l == 0))


def cache_update_gpu(cache: KVCache, new_k, new_v, slots, positions, *, interpret: bool = False) -> KVCache:
    """GPU Pallas (Triton) twin of `write_rows`: grid (L, B, T), one row per program.
    An 8-bit cache (QuantSlots) gets the rows quantized as `models.cache.quantize`
    does, values and scales written in place."""
    L, B, S, Hkv, D, T = _check(cache, new_k, new_v, slots, positions)
    if T == 0:
        return cache
    pairs = _rows(cache.k, new_k) + _rows(cache.v, new_v)
    widths = tuple(c.shape[-1] for c, _ in pairs)
    row = lambda l, b, t: (l, b, 0, 0)
    vec = pl.BlockSpec((None, T), lambda l, b, t: (b, 0))
    new_specs = [pl.BlockSpec((None, None, T, W), row) for W in widths]
    cache_specs = [pl.BlockSpec((None, None, S, W), row) for W in widths]
    pos_spec = pl.BlockSpec((None, S), lambda l, b, t: (b, 0))
    n = len(pairs)
    outs = pl.pallas_call(
        functools.partial(_gpu_kernel, S=S, widths=widths),
        out_shape=[jax.ShapeDtypeStruct(c.shape, c.dtype) for c, _ in pairs]
        + [jax.ShapeDtypeStruct(cache.pos.shape, jnp.int32)],
        grid=(L, B, T),
        in_specs=[vec, vec, *new_specs, *cache_specs, pos_spec],
        out_specs=[*cache_specs, pos_spec],
        input_output_aliases={2 + n + i: i for i in range(n + 1)},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="adore_cache_update",
    )(slots.astype(jnp.int32), positions.astype(jnp.int32), *(x for _, x in pairs), *(c for c, _ in pairs),
      cache.pos.astype(jnp.int32))
    half = n // 2
    return KVCache(_as_cache(cache.k, outs[:half]), _as_cache(cache.v, outs[half:n]), outs[n])


# ---------------------------------------------------------------- TPU (Mosaic)


def _tpu_kernel(slots_ref, posv_ref, nk_hbm, nv_hbm, ck_in, cv_in, pos_in, ck_hbm, cv_hbm, pos_out, sems, *, S):
    del ck_in, cv_in  # aliased to ck_hbm / cv_hbm
    b = pl.program_id(0)
    t = pl.program_id(1)

    @pl.when((b == 0) & (t == 0))
    def _():
        pos_out[...] = pos_in[...]  # the aliased VMEM output block starts uninitialised

    slot = slots_ref[b, t]
    ok = (slot >= 0) & (slot < S)

    @pl.when(ok)
    def _():
        ck = pltpu.make_async_copy(nk_hbm.at[:, b, t], ck_hbm.at[:, b, slot], sems.at[0])
        cv = pltpu.make_async_copy(nv_hbm.at[:, b, t], cv_hbm.at[:, b, slot], sems.at[1])
        ck.start()
        cv.start()
        lane = jax.lax.broadcasted_iota(jnp.int32, (1, S), 1)
        pos_out[b] = jnp.where(lane == slot, posv_ref[b, t], pos_out[b])
        ck.wait()
        cv.wait()


def cache_update_tpu(cache: KVCache, new_k, new_v, slots, positions, *, interpret=False) -> KVCache:
    """TPU Pallas (Mosaic) twin of `write_rows`: one DMA per written row and
    tensor (all layers at once, HBM to HBM); slots/positions in SMEM. Plain
    caches only: an 8-bit cache raises ValueError (write_rows takes it)."""
    if cache.quantized:
        raise ValueError("the TPU cache update does not take 8-bit slots (kv dtype int8/float8_e4m3); "
                         "use the 'reference' kernel backend or a bfloat16 cache")
    L, B, S, Hkv, D, T = _check(cache, new_k, new_v, slots, positions)
    if T == 0:
        return cache
    if interpret is True:
        interpret = default_interpret_params()
    nk = new_k.astype(cache.k.dtype)
    nv = new_v.astype(cache.v.dtype)
    pos3 = cache.pos.astype(jnp.int32).reshape(B, 1, S)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    pos_spec = pl.BlockSpec((B, 1, S), lambda b, t, *_: (0, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(B, T),
        in_specs=[any_spec, any_spec, any_spec, any_spec, pos_spec],
        out_specs=[any_spec, any_spec, pos_spec],
        scratch_shapes=[pltpu.SemaphoreType.DMA((2,))],
    )
    out_k, out_v, out_pos = pl.pallas_call(
        functools.partial(_tpu_kernel, S=S),
        out_shape=[
            jax.ShapeDtypeStruct(cache.k.shape, cache.k.dtype),
            jax.ShapeDtypeStruct(cache.v.shape, cache.v.dtype),
            jax.ShapeDtypeStruct(pos3.shape, jnp.int32),
        ],
        grid_spec=grid_spec,
        # operand indices count the two scalar-prefetch operands
        input_output_aliases={4: 0, 5: 1, 6: 2},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
        interpret=interpret,
        name="adore_cache_update_tpu",
    )(slots.astype(jnp.int32), positions.astype(jnp.int32), nk, nv, cache.k, cache.v, pos3)
    return KVCache(out_k, out_v, out_pos.reshape(B, S))
