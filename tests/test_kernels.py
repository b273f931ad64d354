"""Pallas kernels (interpret mode on CPU) against the XLA references.

Every case draws fresh random inputs. Kernel outputs that the interpreter
allocates start as NaN (floats) / INT_MIN (ints), so an element the kernel
never writes shows up; the cache-update tests also poison the aliased cache
with NaN. Compiles use XLA's backend optimisation level 0 (the interpreted
kernels are large programs; this halves compile time).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adore_jax.kernels import (
    ENV_VAR,
    AttentionKernel,
    FewRowMatmul,
    GpuConfig,
    MatmulConfig,
    PrefillConfig,
    TpuConfig,
    blockwise_attention,
    cache_update_gpu,
    cache_update_tpu,
    get_attention_fn,
    get_cache_update_fn,
    get_matmul_fn,
    matmul_gpu,
    reference_matmul,
    resolve_backend,
    sparse_attention_gpu,
    sparse_attention_tpu,
)
from adore_jax.kernels.attention_gpu import auto_splits, padded_rows, plan, warps
from adore_jax.kernels.common import num_sms
from models.attention import AttentionOut, reference_attention
from models.cache import KVCache, write_rows

_SEED = itertools.count(1000)
_FAST = {"xla_backend_optimization_level": 0}


def run_fast(fn, *args):
    return jax.jit(fn).lower(*args).compile(_FAST)(*args)


def make_inputs(B, T, Hq, Hkv, D, S, dtype, cache="partial", seed=None):
    """Random attention inputs. cache: "partial" (about 30% empty slots, positions
    spread before and after the query rows), "empty" (all slots empty) or "full"
    (slots hold positions 0..S-1, queries after them, like decode)."""
    key = jax.random.PRNGKey(next(_SEED) if seed is None else seed)
    ks = jax.random.split(key, 9)
    q = jax.random.normal(ks[0], (B, T, Hq, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, Hkv, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, Hkv, D), jnp.float32).astype(dtype)
    ck = jax.random.normal(ks[3], (B, S, Hkv, D), jnp.float32).astype(dtype)
    cv = jax.random.normal(ks[4], (B, S, Hkv, D), jnp.float32).astype(dtype)
    if cache == "full":
        cpos = jnp.broadcast_to(jax.random.permutation(ks[5], S), (B, S)).astype(jnp.int32)
        qpos = (S + jnp.arange(T, dtype=jnp.int32))[None, :].repeat(B, 0)
    else:
        cpos = jax.random.randint(ks[5], (B, S), 0, 2 * S + 8)
        cpos = jnp.where(jax.random.uniform(ks[6], (B, S)) < 0.3, -1, cpos)
        if cache == "empty":
            cpos = jnp.full((B, S), -1, jnp.int32)
        qpos = jax.random.randint(ks[7], (B, T), 0, 2 * S + 16)
        qpos = qpos.at[0, 0].set(-1)  # a padding row
        if T > 1:
            qpos = qpos.at[-1, 1].set(0)  # a row before every cached position but 0
    return q, k, v, ck, cv, cpos.astype(jnp.int32), qpos.astype(jnp.int32)


def check_against_reference(got, args, with_stats):
    q, k, v, ck, cv, cpos, qpos = args
    ref = reference_attention(*args, with_stats=with_stats)
    assert got.out.shape == ref.out.shape and got.out.dtype == ref.out.dtype
    o, r = np.asarray(got.out, np.float64), np.asarray(ref.out, np.float64)
    assert np.isfinite(o).all(), "unwritten or non-finite output"
    bf16 = q.dtype == jnp.bfloat16
    rel = np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-6)
    assert rel < (1e-2 if bf16 else 1e-5), rel
    np.testing.assert_allclose(o, r, atol=6e-2 if bf16 else 1e-5, rtol=0)
    if not with_stats:
        assert got.mass is None and got.lse is None
        return
    key_pos = np.concatenate([np.asarray(cpos), np.asarray(qpos)], axis=1)  # [B, S+T]
    qp = np.asarray(qpos)
    allowed = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= qp[:, :, None])
    has_key = allowed.any(-1)  # [B, T]
    lse, lref = np.asarray(got.lse), np.asarray(ref.lse)
    assert lse.shape == lref.shape and np.isfinite(lse).all()
    np.testing.assert_allclose(lse[has_key], lref[has_key], atol=1e-3 if bf16 else 1e-5, rtol=1e-5)
    assert (lse[~has_key] < -1e29).all()
    assert np.all(o[~has_key] == 0)
    mass, mref = np.asarray(got.mass), np.asarray(ref.mass)
    assert mass.shape == mref.shape and np.isfinite(mass).all()
    np.testing.assert_allclose(mass, mref, atol=2e-3 if bf16 else 2e-5, rtol=1e-3 if bf16 else 1e-5)
    assert np.all(mass[~allowed] == 0)


F32, BF16 = jnp.float32, jnp.bfloat16

GPU_CASES = [
    # B, T, Hq, Hkv, D, S, dtype, cache, config, with_stats
    (2, 1, 8, 8, 32, 37, F32, "partial", GpuConfig(block_s=16, splits=3), True),  # MHA, tail, 3 splits
    (2, 2, 6, 2, 32, 64, F32, "partial", GpuConfig(block_s=16, splits=2), True),  # G=3, exact splits
    (1, 9, 24, 3, 16, 45, F32, "partial", GpuConfig(block_s=16), True),  # G=8, T=9: 72 rows
    (2, 9, 9, 3, 32, 29, BF16, "partial", GpuConfig(block_s=16, merge="xla"), True),  # XLA merge
    (2, 1, 8, 1, 32, 50, F32, "empty", GpuConfig(block_s=16, splits=2), True),  # MQA, all-empty cache
    (2, 9, 8, 8, 16, 33, F32, "full", GpuConfig(block_s=16, splits=1), False),  # one split: direct write
    (1, 2, 3, 1, 64, 200, BF16, "partial", GpuConfig(), False),  # default plan
    (2, 9, 9, 3, 64, 300, BF16, "partial", GpuConfig(), True),  # default plan at 27 rows, D=64: 64-slot blocks, tail
    (2, 1, 4, 2, 32, 9, F32, "partial", GpuConfig(), True),  # a cache shorter than one block
    (1, 1, 4, 2, 128, 100, BF16, "partial", GpuConfig(), True),  # default plan at D=128, T=1: 32-slot blocks, 2 splits, tail
    (1, 2, 4, 4, 32, 70, BF16, "partial", GpuConfig(block_s=16, splits=4), True),  # tail block overlaps the split before
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D,S,dtype,cache,config,with_stats", GPU_CASES)
def test_gpu_attention_matches_reference(B, T, Hq, Hkv, D, S, dtype, cache, config, with_stats):
    args = make_inputs(B, T, Hq, Hkv, D, S, dtype, cache)
    got = run_fast(lambda *a: sparse_attention_gpu(*a, with_stats=with_stats, interpret=True, config=config), *args)
    check_against_reference(got, args, with_stats)


TPU_CASES = [
    (2, 1, 8, 2, 64, 300, F32, "partial", TpuConfig(block_s=128, splits=2), True),  # 2 heads per block, clamped block
    (1, 9, 3, 3, 64, 37, F32, "partial", TpuConfig(), True),  # odd Hkv*D=192 lanes, one block
    (2, 3, 8, 4, 32, 256, BF16, "partial", TpuConfig(block_s=128), True),  # 4 heads per block
    (1, 2, 4, 1, 128, 600, F32, "empty", TpuConfig(block_s=128, splits=3), True),  # all-empty, tail
    (2, 1, 8, 8, 128, 130, BF16, "full", TpuConfig(block_s=128), False),  # MHA, tail of 2
    (1, 9, 16, 2, 128, 64, F32, "partial", TpuConfig(), False),  # G=8, T=9
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D,S,dtype,cache,config,with_stats", TPU_CASES)
def test_tpu_attention_matches_reference(B, T, Hq, Hkv, D, S, dtype, cache, config, with_stats):
    args = make_inputs(B, T, Hq, Hkv, D, S, dtype, cache)
    got = run_fast(lambda *a: sparse_attention_tpu(*a, with_stats=with_stats, interpret=True, config=config), *args)
    check_against_reference(got, args, with_stats)


@pytest.mark.parametrize("fn,config", [(sparse_attention_gpu, GpuConfig(block_s=16, splits=2)),
                                       (sparse_attention_tpu, TpuConfig(block_s=128, splits=2))], ids=["gpu", "tpu"])
def test_stacked_cache_reads_only_its_layer(fn, config):
    """Given layer=l and the stacked [L, B, S, Hkv, D] cache (every other layer
    NaN), the kernel equals the reference on layer l alone, for each l."""
    L, (B, T, Hq, Hkv, D, S) = 3, (2, 2, 8, 2, 64, 150)
    for layer in range(L):
        q, k, v, ck, cv, cpos, qpos = make_inputs(B, T, Hq, Hkv, D, S, F32)
        nan = jnp.full((L, B, S, Hkv, D), jnp.nan, F32)
        ck_all, cv_all = nan.at[layer].set(ck), nan.at[layer].set(cv)
        got = run_fast(lambda q, k, v, a, b, cp, qp, li: fn(q, k, v, a, b, cp, qp, layer=li, with_stats=True,
                                                            interpret=True, config=config),
                       q, k, v, ck_all, cv_all, cpos, qpos, jnp.int32(layer))
        check_against_reference(got, (q, k, v, ck, cv, cpos, qpos), True)


@pytest.mark.parametrize("T,S,block,cache,stacked", [
    (20, 50, 16, "partial", False),  # 3 full blocks + a tail of 2
    (20, 64, 16, "empty", True),  # no tail, all slots empty, stacked cache
    (1, 37, 8, "full", True),  # decode-like row
])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "plain"])
def test_blockwise_matches_reference(T, S, block, cache, stacked, flat):
    """The long-chunk XLA path (blocks of slots, online softmax, mass in a second
    pass) equals the plain reference, stats included, with both ways of slicing."""
    args = make_inputs(2, T, 6, 2, 16, S, F32, cache)
    q, k, v, ck, cv, cpos, qpos = args
    kw = {}
    if stacked:  # layer 1 of 3; the other layers NaN
        nan = jnp.full((3, *ck.shape), jnp.nan, F32)
        ck, cv, kw = nan.at[1].set(ck), nan.at[1].set(cv), {"layer": jnp.int32(1)}
    got = jax.jit(lambda *a: blockwise_attention(*a, with_stats=True, block=block, flat_slices=flat, **kw))(
        q, k, v, ck, cv, cpos, qpos)
    check_against_reference(got, args, True)


def test_blockwise_bounds_temporary_memory():
    """A prefill-sized chunk (T = 512 over 16384 slots): the blockwise path's
    temporaries are a fraction of one of the reference's full score matrices."""
    B, T, Hq, Hkv, D, S = 2, 512, 8, 2, 64, 16384
    shapes = [(B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, S, Hkv, D), (B, S, Hkv, D)]
    args = [jax.ShapeDtypeStruct(x, jnp.bfloat16) for x in shapes]
    args += [jax.ShapeDtypeStruct((B, S), jnp.int32), jax.ShapeDtypeStruct((B, T), jnp.int32)]

    def temp(fn):
        return jax.jit(lambda *a: fn(*a, with_stats=True)).lower(*args).compile().memory_analysis().temp_size_in_bytes

    scores = B * Hq * T * S * 4  # one fp32 score matrix
    assert temp(reference_attention) > scores
    assert temp(blockwise_attention) < scores / 3


PREFILL_CASES = [
    # B, T, Hq, Hkv, D, S, dtype, cache, config
    (2, 40, 4, 4, 32, 37, F32, "partial", PrefillConfig(rows=16, block_s=16)),  # MHA: 3 tiles, tails everywhere
    (1, 17, 6, 2, 16, 64, F32, "full", PrefillConfig(rows=16, block_s=16)),  # G=3 (5 tokens per tile), no slot tail
    (2, 33, 16, 2, 32, 50, BF16, "partial", PrefillConfig(rows=32, block_s=16)),  # G=8: 4 tokens per tile
    (1, 20, 4, 1, 16, 29, F32, "empty", PrefillConfig(rows=16, block_s=16)),  # MQA, all slots empty
    (2, 24, 3, 3, 64, 200, BF16, "partial", PrefillConfig()),  # defaults: one tile, 3 full blocks + a tail
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D,S,dtype,cache,config", PREFILL_CASES)
def test_gpu_prefill_matches_reference(B, T, Hq, Hkv, D, S, dtype, cache, config):
    """Chunks longer than the decode kernel takes go to the prefill kernel (no
    statistics), which equals the reference on fresh inputs (outputs start NaN)."""
    args = make_inputs(B, T, Hq, Hkv, D, S, dtype, cache)
    fn = lambda *a: sparse_attention_gpu(*a, interpret=True, config=GpuConfig(prefill=config))
    assert "adore_prefill_attention" in str(jax.make_jaxpr(fn)(*args))
    check_against_reference(run_fast(fn, *args), args, False)


def test_gpu_prefill_kernel_can_be_turned_off():
    args = make_inputs(1, 20, 4, 2, 16, 24, F32)
    on = jax.make_jaxpr(lambda *a: sparse_attention_gpu(*a, interpret=True))(*args)
    off = jax.make_jaxpr(lambda *a: sparse_attention_gpu(*a, interpret=True, config=GpuConfig(prefill=None)))(*args)
    assert "adore_prefill_attention" in str(on) and "adore_prefill_attention" not in str(off)


@pytest.mark.parametrize("kw", [dict(block_s=48), dict(block_s=8), dict(splits=0), dict(ctas_per_sm=0), dict(num_stages=-1),
                                dict(num_warps=0), dict(merge="atomic"), dict(merge_loads="cached")])
def test_gpu_config_rejects_bad_values(kw):
    with pytest.raises(ValueError, match="GpuConfig"):
        GpuConfig(**kw)


@pytest.mark.parametrize("kw", [dict(block_s=48), dict(block_s=8), dict(rows=0), dict(num_warps=0)])
def test_prefill_config_rejects_bad_values(kw):
    with pytest.raises(ValueError, match="PrefillConfig"):
        PrefillConfig(**kw)


def test_gpu_prefill_reads_only_its_layer():
    """With layer=l of a stacked cache whose other layers are NaN."""
    L, (B, T, Hq, Hkv, D, S) = 3, (2, 20, 4, 2, 32, 45)
    for layer in range(L):
        q, k, v, ck, cv, cpos, qpos = make_inputs(B, T, Hq, Hkv, D, S, F32)
        nan = jnp.full((L, B, S, Hkv, D), jnp.nan, F32)
        got = run_fast(lambda q, k, v, a, b, cp, qp, li: sparse_attention_gpu(
            q, k, v, a, b, cp, qp, layer=li, interpret=True, config=GpuConfig(prefill=PrefillConfig(rows=16, block_s=16))),
            q, k, v, nan.at[layer].set(ck), nan.at[layer].set(cv), cpos, qpos, jnp.int32(layer))
        check_against_reference(got, (q, k, v, ck, cv, cpos, qpos), False)


def test_gpu_prefill_skips_slots_after_the_last_used_one():
    """A cache filled from the front (as a prefill fills it): 21 slots used of 64.
    The blocks after the last used one are not read: NaN there changes nothing."""
    B, T, Hq, Hkv, D, S = 2, 20, 4, 2, 16, 64
    q, k, v, ck, cv, _, _ = make_inputs(B, T, Hq, Hkv, D, S, F32)
    cpos = jnp.where(jnp.arange(S) < 21, jnp.arange(S), -1)[None].repeat(B, 0).astype(jnp.int32)
    qpos = (21 + jnp.arange(T, dtype=jnp.int32))[None].repeat(B, 0)
    unread = (jnp.arange(S) >= 32)[None, :, None, None]  # blocks of 16: slots 0-31 are read
    fn = lambda *a: sparse_attention_gpu(*a, interpret=True, config=GpuConfig(prefill=PrefillConfig(rows=16, block_s=16)))
    got = run_fast(fn, q, k, v, jnp.where(unread, jnp.nan, ck), jnp.where(unread, jnp.nan, cv), cpos, qpos)
    check_against_reference(got, (q, k, v, ck, cv, cpos, qpos), False)


@pytest.mark.parametrize("Hq,Hkv,D,dtype", [(32, 32, 128, BF16), (9, 3, 64, F32)], ids=["7b-bf16", "smollm2-f32"])
def test_gpu_prefill_lowers_for_cuda(Hq, Hkv, D, dtype):
    """The Triton lowering accepts the prefill kernel at the 7B and SmolLM2 head
    shapes (lowered for the cuda platform on the CPU)."""
    L, B, T, S = 2, 2, 512, 1000
    shapes = [((B, T, Hq, D), dtype), ((B, T, Hkv, D), dtype), ((B, T, Hkv, D), dtype), ((L, B, S, Hkv, D), dtype),
              ((L, B, S, Hkv, D), dtype), ((B, S), jnp.int32), ((B, T), jnp.int32), ((), jnp.int32)]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    fn = lambda q, k, v, a, b, cp, qp, li: sparse_attention_gpu(q, k, v, a, b, cp, qp, layer=li).out
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "adore_prefill_attention" in text and "dynamic_slice" not in text
    assert "ex2.approx.ftz.f32" in text  # the base-2 loop's exponential (softmax_gpu.exp2), not libdevice's expf


@pytest.mark.parametrize("fn", [sparse_attention_gpu, sparse_attention_tpu], ids=["gpu", "tpu"])
def test_long_chunks_fall_back_to_reference(fn):
    args = make_inputs(1, 20, 4, 2, 16, 24, F32)  # T = 20 > 16: prefill-like chunk
    got = jax.jit(lambda *a: fn(*a, with_stats=True, interpret=True))(*args)
    ref = jax.jit(lambda *a: reference_attention(*a, with_stats=True))(*args)
    for a, b in zip((got.out, got.mass, got.lse), (ref.out, ref.mass, ref.lse)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gpu_plan_splits_cover_slots():
    sms = num_sms()
    for B, Hkv, S, D in [(8, 8, 1024, 128), (32, 3, 8192, 64), (8, 32, 4096, 128), (1, 1, 37, 64), (4, 2, 1000, 128),
                         (64, 32, 1024, 128), (1, 8, 16384, 128)]:
        for rows in (16, 64):
            bs, ns, sp, stages = plan(B, Hkv, S, D, GpuConfig(), rows)
            assert sp % bs == 0 and ns * sp >= S and (ns - 1) * sp < S and stages >= 3
            if rows == 64 or B * Hkv >= 1.9 * sms:  # rounds of 2 programs an SM: no mostly idle last round
                rounds = -(-B * Hkv * ns // (2 * sms))
                assert rounds == 1 or B * Hkv * ns > 0.85 * rounds * 2 * sms
            else:  # about two programs an SM where the blocks allow
                assert B * Hkv * ns >= 1.9 * sms or ns >= S // bs // 5  # splits of 5 blocks at least
    assert plan(8, 8, 4096, 128, GpuConfig(), 64)[1] == 2 * sms // 64  # 2 programs an SM from 32 rows
    assert plan(8, 8, 4096, 128, GpuConfig(ctas_per_sm=4), 64)[1] == 4 * sms // 64
    # blocks and stages: 32 x 4 up to 16 rows at D = 128, 64 x 3 at D = 64 and from 32 rows
    assert plan(8, 8, 4096, 128, GpuConfig())[::3] == (32, 4) and plan(8, 8, 4096, 128, GpuConfig(), 32)[::3] == (64, 3)
    assert plan(32, 3, 4096, 64, GpuConfig())[::3] == (64, 3) and plan(32, 3, 4096, 64, GpuConfig(), 32)[::3] == (64, 3)
    assert plan(8, 8, 4096, 128, GpuConfig(block_s=128, num_stages=2))[::3] == (128, 2)
    assert (padded_rows(1, 1), padded_rows(1, 9), padded_rows(3, 9), padded_rows(8, 9)) == (16, 16, 32, 128)
    # warps: 2 up to 16 rows and up to 32 at D <= 64, else 4, or the config's (docs/KERNELS.md, "Design notes")
    assert [warps(padded_rows(G, T), D, GpuConfig()) for G, T, D in
            [(3, 1, 128), (1, 9, 128), (1, 16, 128), (3, 9, 64), (3, 9, 128), (8, 9, 64)]] == [2, 2, 2, 2, 4, 4]
    assert warps(16, 64, GpuConfig(num_warps=8)) == 8


def test_gpu_plan_one_row_splits_at_the_bench_shapes(monkeypatch):
    """Up to 16 rows (T = 1) on an H200's 132 SMs, the split counts measured best
    (docs/KERNELS.md): none for MHA at B = 8 (256 programs), 4 for 64 or 96
    (b, kv head) pairs, but 3 (6-block splits) for 96 at S = 1024, 2 for
    SmolLM2's B = 64 step; full attention's 16498 slots: none at B = 8, 3 at B = 10
    (320 programs; 2 splits were 17-20% slower)."""
    monkeypatch.setattr("adore_jax.kernels.attention_gpu.num_sms", lambda: 132)
    got = {(B, Hkv, S): plan(B, Hkv, S, D, GpuConfig())[1] for B, Hkv, D in [(8, 8, 128), (32, 3, 64), (8, 32, 128)]
           for S in (1024, 4096, 8192)}
    assert got == {(8, 8, 1024): 4, (8, 8, 4096): 4, (8, 8, 8192): 4, (32, 3, 1024): 3, (32, 3, 4096): 4,
                   (32, 3, 8192): 4, (8, 32, 1024): 1, (8, 32, 4096): 1, (8, 32, 8192): 1}
    assert plan(64, 3, 1024, 64, GpuConfig())[1] == 2 and plan(8, 32, 16498, 128, GpuConfig())[1] == 1
    assert plan(10, 32, 16498, 128, GpuConfig())[1] == 3 and plan(64, 3, 8306, 64, GpuConfig())[1] == 2
    assert plan(16, 3, 1024, 64, GpuConfig())[1] == plan(48, 3, 1024, 64, GpuConfig())[1] == 3  # measured by rules.py (docs/KERNELS.md)


def test_gpu_auto_splits_fewest_near_best():
    assert auto_splits(256, 528, 8) == 2  # exactly one round of 4 an SM
    assert auto_splits(96, 264, 64) == 5  # 1.82 rounds: within 12% of the limit, where 2 splits fill 73% of one
    assert auto_splits(96, 264, 4) == 2  # few blocks: 2 splits (one round) tie 4 (1.45 rounds); the fewest
    assert auto_splits(2048, 528, 16) == 1  # more programs than the GPU holds: no splitting
    assert auto_splits(8, 528, 1) == 1
    # counted one program an SM, from 1.9 programs an SM (up to 16 rows)
    assert auto_splits(256, 132, 16, 1.9 * 132) == 1  # 1.94 an SM already
    assert auto_splits(64, 132, 64, 1.9 * 132) == 4  # 4 splits: 1.94 an SM; 6 and 8 cost the same
    assert auto_splits(96, 132, 8, 1.9 * 132) == 4  # 3 splits would leave a third of the SMs with 3 programs
    assert auto_splits(8, 132, 2, 1.9 * 132) == 2  # too few blocks to reach 1.9 an SM: the most splits allowed


# ---------------------------------------------------------------- cache update


def make_update(L, B, S, Hkv, D, T, dtype, poison=False, seed=None):
    key = jax.random.PRNGKey(next(_SEED) if seed is None else seed)
    ks = jax.random.split(key, 7)
    shape = (L, B, S, Hkv, D)
    ck = jax.random.normal(ks[0], shape, jnp.float32).astype(dtype)
    cv = jax.random.normal(ks[1], shape, jnp.float32).astype(dtype)
    if poison:  # every slot not written must keep its NaN
        ck, cv = jnp.full(shape, jnp.nan, dtype), jnp.full(shape, jnp.nan, dtype)
    cache = KVCache(ck, cv, jax.random.randint(ks[2], (B, S), -1, 50).astype(jnp.int32))
    nk = jax.random.normal(ks[3], (L, B, T, Hkv, D), jnp.float32)
    nv = jax.random.normal(ks[4], (L, B, T, Hkv, D), jnp.float32)
    slots = jnp.stack([jax.random.permutation(k, S)[:T] for k in jax.random.split(ks[5], B)]).astype(jnp.int32)
    slots = slots.at[0, 0].set(-1)  # dropped row
    if T > 2:
        slots = slots.at[-1, 2].set(S + 5)  # out of range: dropped too
    positions = jax.random.randint(ks[6], (B, T), 0, 1000).astype(jnp.int32)
    return cache, nk, nv, slots, positions


UPDATE_CASES = [
    (2, 2, 10, 3, 16, 3, F32, False),
    (3, 2, 37, 2, 64, 9, BF16, False),
    (2, 3, 20, 1, 128, 4, F32, True),
]


@pytest.mark.parametrize("impl", [cache_update_gpu, cache_update_tpu], ids=["gpu", "tpu"])
@pytest.mark.parametrize("L,B,S,Hkv,D,T,dtype,poison", UPDATE_CASES)
def test_cache_update_matches_write_rows(impl, L, B, S, Hkv, D, T, dtype, poison):
    cache, nk, nv, slots, positions = make_update(L, B, S, Hkv, D, T, dtype, poison)
    ref = write_rows(cache, nk, nv, slots, positions)
    got = run_fast(lambda *a: impl(*a, interpret=True), cache, nk, nv, slots, positions)
    for a, b in zip((got.k, got.v, got.pos), (ref.k, ref.v, ref.pos)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # NaN == NaN here
    # the untouched slots really were untouched, and the dropped rows went nowhere
    written = np.zeros((B, S), bool)
    for b, t in itertools.product(range(B), range(T)):
        s = int(slots[b, t])
        if 0 <= s < S:
            written[b, s] = True
    np.testing.assert_array_equal(np.asarray(got.pos)[~written], np.asarray(cache.pos)[~written])
    assert written.sum() == int(((slots >= 0) & (slots < S)).sum())


# ---------------------------------------------------------------- switch


def test_resolve_backend_and_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend("auto") == "reference"  # CPU
    assert get_attention_fn().backend == "reference"
    assert get_cache_update_fn() is write_rows
    for name in ("reference", "pallas_gpu", "pallas_tpu"):
        assert get_attention_fn(name).backend == name
        monkeypatch.setenv(ENV_VAR, name)
        assert resolve_backend("auto") == name
        assert get_attention_fn().backend == name
        monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv(ENV_VAR, "pallas_gpu")
    assert get_attention_fn("reference").backend == "reference"  # explicit argument wins
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=ENV_VAR):
        get_attention_fn()
    with pytest.raises(ValueError, match="unknown kernel backend"):
        get_attention_fn("triton")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        get_cache_update_fn("mosaic")


def test_engine_picks_the_platform_kernels_by_default(monkeypatch):
    """EngineConfig's "auto" kernels: XLA's reference on CPU; the Pallas GPU
    kernels where the platform (or ADORE_KERNEL_BACKEND) says GPU; on TPU the
    reference unless the variable asks for the TPU kernels (not run on TPU
    hardware). Equal settings give equal, hashable configs (one compile)."""
    import adore_jax.kernels as kernels
    from adore_jax.engine import EngineConfig

    make = lambda **kw: EngineConfig(max_new_tokens=2, prompt_len=16, chunk=16, **kw)
    monkeypatch.delenv(ENV_VAR, raising=False)
    ec = make()
    assert (ec.attn_fn.backend, ec.cache_update, ec.matmul_fn) == ("reference", write_rows, None)
    assert make() == ec and hash(make()) == hash(ec)
    assert make(matmul_fn=None).matmul_fn is None and make(attn_fn=reference_attention).attn_fn is reference_attention
    with pytest.raises(ValueError, match="attn_fn must be a function or 'auto'"):
        make(attn_fn="pallas")
    monkeypatch.setenv(ENV_VAR, "pallas_gpu")
    ec = make()
    assert ec.attn_fn.backend == "pallas_gpu" and isinstance(ec.matmul_fn, FewRowMatmul) and make() == ec
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setattr(kernels.jax, "default_backend", lambda: "tpu")
    assert make().attn_fn.backend == "reference"
    monkeypatch.setenv(ENV_VAR, "pallas_tpu")
    assert make().attn_fn.backend == "pallas_tpu"


def test_with_stats_refused_by_kernel_without_stats():
    args = make_inputs(1, 1, 2, 1, 16, 8, F32)
    no_stats = AttentionKernel("pallas_gpu", lambda q, *a, **kw: AttentionOut(q), supports_stats=False)
    assert no_stats(*args).out is args[0]  # fine without stats
    with pytest.raises(ValueError, match="cannot return statistics"):
        no_stats(*args, with_stats=True)


def test_switch_cache_update_functions():
    # (the attention functions of the switch run inside the model in test_model_forward_with_kernel)
    upd = make_update(2, 2, 12, 2, 16, 3, F32)
    want = write_rows(*upd)
    for name in ("pallas_gpu", "pallas_tpu"):
        got = run_fast(get_cache_update_fn(name, interpret=True), *upd)
        np.testing.assert_array_equal(np.asarray(got.k), np.asarray(want.k))


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_model_forward_with_kernel(backend):
    """The kernel inside the model's scan over layers gives the reference's logits and mass."""
    from models.llama import LlamaConfig, forward, init_params

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32, max_position_embeddings=256)
    params = init_params(cfg, jax.random.PRNGKey(0), scale=0.3)
    B, S, T = 2, 24, 3
    ks = jax.random.split(jax.random.PRNGKey(next(_SEED)), 4)
    shape = (cfg.num_layers, B, S, cfg.num_kv_heads, cfg.head_dim)
    pos = jnp.where(jax.random.uniform(ks[2], (B, S)) < 0.25, -1, jnp.arange(S)[None, :].repeat(B, 0))
    cache = KVCache(jax.random.normal(ks[0], shape), jax.random.normal(ks[1], shape), pos.astype(jnp.int32))
    tokens = jax.random.randint(ks[3], (B, T), 0, cfg.vocab_size)
    positions = jnp.array([[S, S + 1, S + 2], [S, S + 1, -1]], jnp.int32)
    attn = get_attention_fn(backend, interpret=True)

    def run(fn):
        return forward(params, cfg, tokens, positions, cache, attn_fn=fn, with_stats=True)

    want = jax.jit(lambda: run(reference_attention))()
    got = jax.jit(lambda: run(attn)).lower().compile(_FAST)()
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(got[3]), np.asarray(want[3]), atol=1e-5)


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_engine_same_tokens_with_kernels(backend):
    """The decode engine gives the same greedy tokens through the Pallas kernels
    (interpret mode; on GPU the few-row matmul too) as through the XLA reference,
    for full attention and ADORE."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_model import CFG, prompts, tiny_controller, tiny_params

    from adore_jax import engine
    from adore_jax.kernels import get_attention_fn, get_cache_update_fn, get_matmul_fn
    from adore_jax.kernels import PROJECTIONS
    from adore_jax.policies import make_policy

    params, ctrl = tiny_params(), tiny_controller()
    ps = prompts(40, [5, 11])
    kernels = dict(attn_fn=get_attention_fn(backend, interpret=True), cache_update=get_cache_update_fn(backend, interpret=True),
                   matmul_fn=get_matmul_fn(backend, interpret=True, groups=PROJECTIONS))  # TPU: None
    for pol in (make_policy("full"), make_policy("adore", 8, rebuild=2, controller_graphdef=ctrl[0])):
        ref = engine.generate(params, CFG, ps, 10, policy=pol, policy_params=ctrl[1])
        assert engine.generate(params, CFG, ps, 10, policy=pol, policy_params=ctrl[1], **kernels) == ref


def test_gpu_kernel_lowers_for_cuda_with_stacked_cache():
    """The Triton lowering accepts the stacked cache and a traced layer index, and
    takes each exponential as one ex2.approx (lowered for the cuda platform on the
    CPU, no GPU needed)."""
    L, B, T, Hq, Hkv, D, S = 3, 2, 1, 8, 2, 64, 1000
    shapes = [((B, T, Hq, D), BF16), ((B, T, Hkv, D), BF16), ((B, T, Hkv, D), BF16), ((L, B, S, Hkv, D), BF16),
              ((L, B, S, Hkv, D), BF16), ((B, S), jnp.int32), ((B, T), jnp.int32), ((), jnp.int32)]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    fn = lambda q, k, v, a, b, cp, qp, li: sparse_attention_gpu(q, k, v, a, b, cp, qp, layer=li, with_stats=True).out
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "adore_sparse_attention" in text
    assert "ex2.approx.ftz.f32" in text  # the base-2 loop's exponential (softmax_gpu.exp2), not libdevice's expf


def test_stacked_cache_shape_errors():
    q, k, v, ck, cv, cpos, qpos = make_inputs(1, 1, 4, 2, 16, 8, F32)
    for fn in (sparse_attention_gpu, sparse_attention_tpu):
        with pytest.raises(ValueError, match=r"with layer=, cache_k/v must be \[L, B, S, Hkv, D\]"):
            fn(q, k, v, ck, cv, cpos, qpos, layer=0, interpret=True)  # a per-layer cache given with a layer


# ---------------------------------------------------------------- few-row matmul

MATMUL_CASES = [  # (M, K, [N_i], dtype, config)
    (1, 64, [48], F32, MatmulConfig()),
    (5, 200, [130, 30, 30], BF16, MatmulConfig(block_n=32, block_k=64, splits=3)),  # ragged K, N and last split
    (16, 576, [192], BF16, MatmulConfig(block_n=64, block_k=64)),
    (64, 96, [40, 40, 24], F32, MatmulConfig(block_n=16, block_k=32, splits=2)),
    (9, 130, [70], F32, MatmulConfig(block_n=16, block_k=32, splits=5)),  # 5 splits of 32: the last one empty
]


@pytest.mark.parametrize("M,K,Ns,dtype,config", MATMUL_CASES)
def test_few_row_matmul_matches_reference(M, K, Ns, dtype, config):
    """Fresh random x [M, K] and weights [K, N_i]: each product equals XLA's fp32
    matmul (interpret mode: an output element never written stays NaN)."""
    key = jax.random.PRNGKey(next(_SEED))
    x = jax.random.normal(key, (M, K), jnp.float32).astype(dtype)
    ws = [jax.random.normal(jax.random.fold_in(key, i + 1), (K, N), jnp.float32).astype(dtype) for i, N in enumerate(Ns)]
    got = run_fast(lambda x, ws: matmul_gpu(x, ws, interpret=True, config=config), x, ws)
    assert [g.shape for g in got] == [(M, N) for N in Ns]
    for g, w in zip(got, ws):
        want = reference_matmul(x.astype(jnp.float32), w.astype(jnp.float32))
        np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-5, atol=1e-4 * np.sqrt(K))
    one = run_fast(lambda x, w: matmul_gpu(x, w, interpret=True, config=config), x, ws[0])  # a single weight: one array
    np.testing.assert_array_equal(np.asarray(one), np.asarray(got[0]))


def test_few_row_matmul_plan():
    """Splits cover K in whole blocks; the pipeline's tiles fit the shared-memory budget."""
    from adore_jax.kernels.matmul_gpu import SMEM_BYTES, plan

    for M, K, N in [(8, 4096, 12288), (8, 11008, 4096), (64, 4096, 22016), (1, 576, 192), (3, 130, 70)]:
        Mp, bn, bk, ns, ks = plan(M, K, N)
        assert Mp >= max(16, M) and ks % bk == 0 and ns * ks >= K and (ns - 1) * ks < K
        assert MatmulConfig().num_stages * (Mp + bn) * bk * 2 <= SMEM_BYTES
    assert plan(8, 4096, 4096)[3] > 1 and plan(8, 4096, 32000)[3] == 1  # few column blocks: K is split


def test_few_row_matmul_rejects_what_it_cannot_take():
    x, w = jnp.ones((65, 32), BF16), jnp.ones((32, 16), BF16)
    with pytest.raises(ValueError, match="matmul_gpu takes x"):
        matmul_gpu(x, w, interpret=True)  # too many rows
    with pytest.raises(ValueError, match="matmul_gpu takes x"):
        matmul_gpu(x[:8], w.astype(F32), interpret=True)  # dtypes differ
    with pytest.raises(ValueError, match="unknown projection groups"):
        FewRowMatmul(groups=("qkv", "mlp"))
    fn = get_matmul_fn("pallas_gpu", interpret=True)
    assert fn.takes("qkv", x[:8], [w]) and not fn.takes("qkv", x, [w]) and not fn.takes("down", x[:8], [w])
    assert get_matmul_fn("reference") is None and get_matmul_fn("pallas_tpu") is None


def test_few_row_matmul_lowers_for_cuda():
    """The Triton lowering accepts q, k and v of the 7B shape in one launch
    (lowered for the cuda platform on the CPU)."""
    x = jax.ShapeDtypeStruct((8, 4096), BF16)
    ws = [jax.ShapeDtypeStruct((4096, 4096), BF16)] * 3
    text = jax.jit(lambda x, ws: matmul_gpu(x, ws)).trace(x, ws).lower(lowering_platforms=("cuda",)).as_text()
    assert "adore_few_row_matmul" in text and "stablehlo.dot_general" not in text  # no XLA matmul beside it


@pytest.mark.parametrize("head_dim,bias", [(32, True), (16, False)], ids=["qkv-rope-bias", "d16-unfused"])
def test_model_forward_with_few_row_matmul(head_dim, bias):
    """The model's projections through the kernels (every group, interpret mode)
    give the XLA matmul's logits and new keys: with head dim 32 q, k and v run
    with RoPE in one kernel (biases too); with 16 they cannot, and run through
    the plain few-row kernel. A chunk of more than FEW_ROWS rows stays
    with XLA."""
    from adore_jax.kernels import PROJECTIONS
    from adore_jax.kernels.matmul_gpu import FEW_ROWS
    from models.llama import LlamaConfig, forward, init_params

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=head_dim, max_position_embeddings=256, attention_bias=bias)
    params = init_params(cfg, jax.random.PRNGKey(next(_SEED)), scale=0.3)
    fn = get_matmul_fn("pallas_gpu", interpret=True, groups=PROJECTIONS)
    B, S = 2, 8
    shape = (cfg.num_layers, B, S, cfg.num_kv_heads, cfg.head_dim)
    cache = KVCache(jnp.zeros(shape), jnp.zeros(shape), jnp.full((B, S), -1, jnp.int32))
    for T in (1, 5):
        tokens = jax.random.randint(jax.random.PRNGKey(next(_SEED)), (B, T), 0, cfg.vocab_size)
        positions = jnp.array([[9, 3, 4, 5, 6][:T], [0, 1, 2, 3, -1][:T]], jnp.int32)
        run = lambda f: forward(params, cfg, tokens, positions, cache, matmul_fn=f)
        want, got = jax.jit(lambda: run(None))(), jax.jit(lambda: run(fn)).lower().compile(_FAST)()
        np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(got.new_k), np.asarray(want.new_k), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(got.new_v), np.asarray(want.new_v), rtol=1e-4, atol=1e-4)
        jaxpr = str(jax.make_jaxpr(lambda: run(fn))())
        assert ("adore_qkv_rope" in jaxpr) == (head_dim == 32) and "adore_few_row_matmul" in jaxpr
    long = jnp.zeros((B, FEW_ROWS // B + 1), jnp.int32)
    jaxpr = str(jax.make_jaxpr(lambda: forward(params, cfg, long, long, cache, matmul_fn=fn))())
    assert "adore_few_row_matmul" not in jaxpr and "adore_qkv_rope" not in jaxpr


QKV_ROPE_CASES = [  # (M, E, D, Hq, Hkv, bias, dtype)
    (5, 200, 32, 4, 2, True, F32),  # ragged E, a padding row at position -1
    (8, 256, 64, 4, 4, False, BF16),
    (1, 96, 32, 3, 1, True, BF16),
]


@pytest.mark.parametrize("M,E,D,Hq,Hkv,bias,dtype", QKV_ROPE_CASES)
def test_qkv_rope_matches_reference(M, E, D, Hq, Hkv, bias, dtype):
    """Fresh random rows, q/k/v weights and biases: the kernel gives the XLA
    reference's q, k, v (interpret mode: unwritten outputs stay NaN)."""
    from adore_jax.kernels import qkv_rope_gpu, reference_qkv_rope
    from models.llama import rope_tables

    ks = jax.random.split(jax.random.PRNGKey(next(_SEED)), 8)
    h = jax.random.normal(ks[0], (M, E)).astype(dtype)
    heads = (Hq, Hkv, Hkv)
    ws = [(0.1 * jax.random.normal(ks[2 + i], (E, n * D))).astype(dtype) for i, n in enumerate(heads)]
    bs = [jax.random.normal(ks[5 + i], (n * D,)).astype(dtype) if bias else None for i, n in enumerate(heads)]
    pos = jnp.array([7, 100, -1, 3, 2048, 5, 6, 9][:M])
    cos, sin = rope_tables(pos, 1.0 / (10000 ** (jnp.arange(0, D, 2) / D)))
    want = reference_qkv_rope(h, ws, bs, cos, sin, head_dim=D)
    got = run_fast(lambda *a: qkv_rope_gpu(*a, head_dim=D, interpret=True, config=MatmulConfig(block_k=64)),
                   h, ws, bs, cos, sin)
    tol = 1e-5 if dtype == F32 else 2e-2
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol)


def test_qkv_rope_rejects_what_it_cannot_take():
    """A head dim under 32 or not a power of two, weights not whole heads, or a
    bias list of another length: a ValueError naming what it takes."""
    from adore_jax.kernels import qkv_rope_gpu

    h, cs = jnp.ones((4, 64), BF16), jnp.ones((4, 16), F32)
    w = jnp.ones((64, 96), BF16)
    for ws, bs, D in [([w], [None], 16), ([w], [None], 48), ([w], [None], 64), ([w, w], [None], 32)]:
        with pytest.raises(ValueError, match="qkv_rope_gpu takes h"):
            qkv_rope_gpu(h, ws, bs, cs, cs, head_dim=D, rope=(True,) * len(ws), interpret=True)


def test_qkv_rope_lowers_for_cuda():
    """The Triton lowering accepts the kernel at the 7B shape (lowered for the
    cuda platform on the CPU)."""
    from adore_jax.kernels import qkv_rope_gpu

    S = jax.ShapeDtypeStruct
    args = (S((8, 4096), BF16), [S((4096, 4096), BF16)] * 3, [None] * 3, S((8, 64), F32), S((8, 64), F32))
    fn = lambda h, ws, bs, c, s: qkv_rope_gpu(h, ws, bs, c, s, head_dim=128)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "adore_qkv_rope" in text and "stablehlo.dot_general" not in text


def test_bench_kernels_matmul_section_runs(tmp_path):
    """python -m eval.bench_kernels's check and matmul sections at tiny sizes (interpret
    mode): the few-row kernels agree with their references, every compared shape has a
    row for XLA and the kernel, and the table and plot are written beside the JSON."""
    import json

    from eval import bench_kernels

    out = tmp_path / "bench.json"
    bench_kernels.main(["--smoke", "--sections", "check,matmul", "--matmul-rows", "1,8", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["correctness_ok"] and all(r["ok"] for r in res["correctness"])
    assert any(r["case"].startswith("matmul") for r in res["correctness"])
    assert any(r["case"].startswith("qkv_rope") for r in res["correctness"])
    assert {(r["shape"], r["M"]) for r in res["matmul"]} == {(s, m) for s in bench_kernels.MATMUL_SMOKE_SHAPES for m in (1, 8)}
    assert all(r["xla"]["us"] > 0 and r["kernel"]["us"] > 0 for r in res["matmul"])
    assert "decode matmuls" in (tmp_path / "bench.txt").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_bench_kernels_bad_arguments_exit_2(capsys):
    from eval import bench_kernels

    for argv, msg in ((["--smoke", "--matmul-rows", "8,x"], "--matmul-rows must be comma-separated integers"),
                      (["--smoke", "--sections", "attn,sweep"], "unknown --sections ['sweep']")):
        with pytest.raises(SystemExit) as e:
            bench_kernels.main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_bench_kernels_table_and_plot_from_json(tmp_path):
    """--from-json writes an earlier run's table and plot and runs nothing."""
    import json

    from eval import bench_kernels

    op = lambda us: {"us": us, "TBps": 1.0}
    row = {"B": 1, "Hq": 2, "Hkv": 1, "D": 16, "S": 64, "T": 1, "ours": op(2.0), "cudnn": op(3.0), "xla_ref": op(9.0),
           "copy_same_size": op(1.0), "ours_frac_copy": 0.5, "copy_same_size_TBps": 2.0, "ours_frac_copy_same_size": 0.5}
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"timer": "device", "copy": {"best_copy_TBps": 2.0}, "attention": [row],
                                "correctness_ok": True}))
    bench_kernels.main(["--from-json", str(path)])
    text = (tmp_path / "run.txt").read_text()
    assert "copy bandwidth 2.00 TB/s" in text and "1.50" in text and "correctness on device: PASS" in text
    assert (tmp_path / "run.png").stat().st_size > 0


def test_bench_kernels_prefill_section_runs(tmp_path, monkeypatch):
    """eval/bench_kernels.py's prefill section at tiny sizes (interpret mode): every
    variant runs and agrees with blockwise_attention; --deadline counts from main(),
    however long ago the module was imported."""
    import json

    from eval import bench_kernels

    monkeypatch.setattr(bench_kernels, "T0", bench_kernels.T0 - 3600)
    out = tmp_path / "bench.json"
    bench_kernels.main(["--smoke", "--sections", "prefill", "--out", str(out)])
    (row,) = json.loads(out.read_text())["prefill"]
    variants = [k for k in row if k.startswith("ours_")]
    assert len(variants) == len(bench_kernels.PREFILL_CONFIGS)
    for k in variants + ["blockwise"]:
        assert row[k]["us"] > 0 and row[k]["rel_err_vs_blockwise"] < 1e-2, (k, row[k])


def test_bench_time_ops_records_rates_and_errors():
    """eval/bench_kernels.time_ops: bytes / time for each op, and an error for an op
    that fails without stopping the others."""
    from eval.bench_kernels import time_ops

    x = jnp.ones((256, 256), jnp.float32)

    def broken(a):
        raise ValueError("does not compile")

    row = time_ops({"neg": lambda a: -a, "bad": broken}, [(x,), (x + 1,)], x.nbytes)
    assert row["neg"]["us"] > 0 and row["neg"]["TBps"] == pytest.approx(x.nbytes / row["neg"]["us"] / 1e6)
    assert len(row["neg"]["times_us"]) == 5
    assert "does not compile" in row["bad"]["error"]
