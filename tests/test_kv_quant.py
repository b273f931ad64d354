"""8-bit KV slots (int8 / float8_e4m3 values, a float32 scale per slot and head).

The reference (quantize on write, dequantize on read) against plain arrays;
the Pallas kernels (interpret mode on CPU) against dequantize-then-reference on
fresh random inputs; the engine with every policy; the mesh's cache specs; the
command line's --kv-dtype.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adore_jax import engine
from adore_jax.kernels import (
    GpuConfig,
    PrefillConfig,
    blockwise_attention,
    cache_update_gpu,
    cache_update_tpu,
    sparse_attention_gpu,
    sparse_attention_tpu,
)
from adore_jax.policies import POLICIES, make_policy
from models.attention import reference_attention
from models.cache import KVCache, QuantSlots, dequantize, quantize, slot_bytes, write_rows
from test_kernels import check_against_reference, make_inputs, run_fast
from tiny_model import CFG, prompts, tiny_controller, tiny_params

F32, BF16, I8, F8 = jnp.float32, jnp.bfloat16, jnp.int8, jnp.float8_e4m3fn
_SEED = itertools.count(5000)


def _key():
    return jax.random.PRNGKey(next(_SEED))


# ---------------------------------------------------------------- quantize / write_rows


@pytest.mark.parametrize("dtype,tol", [(I8, 0.5 / 127), (F8, 2.0**-4)])
def test_quantize_round_trip(dtype, tol):
    """Each row's error is within half a step of its own absmax (int8), or e4m3's
    relative step; an all-zero row stays zero with scale 1."""
    x = jax.random.normal(_key(), (3, 5, 2, 32), F32) * jnp.array([1e-3, 1.0])[:, None]
    x = x.at[0, 0, 1].set(0.0)
    qs = quantize(x, dtype)
    assert qs.values.dtype == dtype and qs.scale.shape == (3, 5, 2) and qs.scale.dtype == F32
    back = np.asarray(dequantize(qs))
    amax = np.abs(np.asarray(x)).max(-1, keepdims=True)
    assert np.all(np.abs(back - np.asarray(x)) <= tol * amax * 1.0001 + 1e-12)
    assert float(qs.scale[0, 0, 1]) == 1.0 and np.all(back[0, 0, 1] == 0)
    assert dequantize(qs, BF16).dtype == BF16


@pytest.mark.parametrize("dtype", [I8, F8])
def test_write_rows_quantizes_written_slots_only(dtype):
    L, B, S, Hkv, D, T = 2, 2, 11, 2, 16, 3
    cache = KVCache.empty(L, B, S, Hkv, D, dtype)
    assert cache.quantized and isinstance(cache.v, QuantSlots) and cache.k.shape == (L, B, S, Hkv, D)
    assert cache.nbytes() == 2 * L * B * S * Hkv * (D + 4) + B * S * 4
    nk, nv = (jax.random.normal(k, (L, B, T, Hkv, D), F32) for k in jax.random.split(_key()))
    slots = jnp.array([[4, -1, 10], [0, 7, S + 2]], jnp.int32)  # -1 and out of range: dropped
    positions = jnp.array([[5, 6, 7], [1, 2, 3]], jnp.int32)
    got = write_rows(cache, nk, nv, slots, positions)
    want_k, want_v = quantize(nk, dtype), quantize(nv, dtype)
    for b, t in [(0, 0), (0, 2), (1, 0), (1, 1)]:
        s = int(slots[b, t])
        for c, w in ((got.k, want_k), (got.v, want_v)):
            np.testing.assert_array_equal(np.asarray(c.values[:, b, s], F32), np.asarray(w.values[:, b, t], F32))
            np.testing.assert_array_equal(np.asarray(c.scale[:, b, s]), np.asarray(w.scale[:, b, t]))
    assert sorted(np.asarray(got.pos[0]).tolist())[-2:] == [5, 7] and int((got.pos >= 0).sum()) == 4
    untouched = np.ones((B, S), bool)
    untouched[0, [4, 10]] = untouched[1, [0, 7]] = False
    assert np.all(np.asarray(got.k.scale)[:, untouched] == 1) and np.all(np.asarray(got.k.values, F32)[:, untouched] == 0)


def test_slot_bytes():
    assert slot_bytes(30, 3, 64, BF16) == 2 * 30 * 3 * 64 * 2
    assert slot_bytes(30, 3, 64, I8) == 2 * 30 * 3 * (64 + 4)
    assert slot_bytes(30, 3, 64, F8) == slot_bytes(30, 3, 64, I8)


# ---------------------------------------------------------------- kernels vs dequantize-then-reference


def quant_inputs(B, T, Hq, Hkv, D, S, dtype, kv, cache="partial"):
    """make_inputs with 8-bit caches: (kernel args with QuantSlots, the same with the
    caches dequantized to float32: the kernels multiply by the scales in float32,
    after the dots, so a bfloat16 rounding of the dequantized rows is not theirs)."""
    q, k, v, ck, cv, cpos, qpos = make_inputs(B, T, Hq, Hkv, D, S, dtype, cache, seed=next(_SEED))
    ck, cv = quantize(ck, kv), quantize(cv, kv)
    plain = (q, k, v, dequantize(ck, F32), dequantize(cv, F32), cpos, qpos)
    return (q, k, v, ck, cv, cpos, qpos), plain


def stack(c: QuantSlots, L: int, layer: int) -> QuantSlots:
    """c as layer `layer` of L stacked layers; the other layers' scales NaN (a read shows)."""
    return QuantSlots(jnp.zeros((L, *c.values.shape), c.values.dtype).at[layer].set(c.values),
                      jnp.full((L, *c.scale.shape), jnp.nan).at[layer].set(c.scale))


DECODE_CASES = [
    # B, T, Hq, Hkv, D, S, dtype, kv, cache, config, with_stats
    (2, 1, 8, 2, 32, 37, F32, I8, "partial", GpuConfig(block_s=16, splits=3), True),  # tail block, 3 splits
    (2, 2, 6, 2, 32, 9, BF16, F8, "partial", GpuConfig(), True),  # a cache shorter than one block: masked loads
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D,S,dtype,kv,cache,config,with_stats", DECODE_CASES)
def test_gpu_decode_dequantizes_in_kernel(B, T, Hq, Hkv, D, S, dtype, kv, cache, config, with_stats):
    """Layer 1 of a stacked 3-layer cache (the others' scales NaN) through the
    decode kernel equals the reference on the dequantized cache."""
    (q, k, v, ck, cv, cpos, qpos), plain = quant_inputs(B, T, Hq, Hkv, D, S, dtype, kv, cache)
    fn = lambda q, k, v, a, b, cp, qp, li: sparse_attention_gpu(q, k, v, a, b, cp, qp, layer=li, with_stats=with_stats,
                                                                 interpret=True, config=config)
    args = (q, k, v, stack(ck, 3, 1), stack(cv, 3, 1), cpos, qpos, jnp.int32(1))
    assert "adore_sparse_attention" in str(jax.make_jaxpr(fn)(*args))
    check_against_reference(run_fast(fn, *args), plain, with_stats)


PREFILL_CASES = [
    # B, T, Hq, Hkv, D, S, dtype, kv, cache
    (2, 21, 4, 2, 16, 37, F32, I8, "partial"),  # tails everywhere, empty slots
    (1, 17, 6, 2, 16, 32, BF16, F8, "full"),  # no slot tail, bf16
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D,S,dtype,kv,cache", PREFILL_CASES)
def test_gpu_prefill_dequantizes_in_kernel(B, T, Hq, Hkv, D, S, dtype, kv, cache):
    args, plain = quant_inputs(B, T, Hq, Hkv, D, S, dtype, kv, cache)
    fn = lambda *a: sparse_attention_gpu(*a, interpret=True, config=GpuConfig(prefill=PrefillConfig(rows=16, block_s=16)))
    assert "adore_prefill_attention" in str(jax.make_jaxpr(fn)(*args))
    check_against_reference(run_fast(fn, *args), plain, False)


def test_blockwise_and_reference_dequantize():
    """blockwise_attention (blocks of 16 slots, each dequantized) and the
    reference itself take 8-bit slots: both equal the reference on the dequantized cache."""
    args, plain = quant_inputs(1, 20, 4, 2, 16, 45, F32, I8)
    check_against_reference(jax.jit(lambda *a: blockwise_attention(*a, with_stats=True, block=16))(*args), plain, True)
    check_against_reference(jax.jit(lambda *a: reference_attention(*a, with_stats=True))(*args), plain, True)


@pytest.mark.parametrize("kv", [I8, F8])
def test_gpu_kernels_lower_for_cuda_with_8bit_slots(kv):
    """The Triton lowering accepts 8-bit values and their scales: decode (full
    blocks, and a cache shorter than one block), prefill (with a slot tail) and
    the cache update (lowered for the cuda platform on the CPU)."""
    L, B, Hq, Hkv, D = 2, 2, 8, 2, 64
    sds = jax.ShapeDtypeStruct
    for S, T, name in ((1000, 1, "adore_sparse_attention"), (10, 2, "adore_sparse_attention"),
                       (1000, 64, "adore_prefill_attention")):
        cache = lambda: QuantSlots(sds((L, B, S, Hkv, D), kv), sds((L, B, S, Hkv), F32))
        args = [sds((B, T, Hq, D), BF16), sds((B, T, Hkv, D), BF16), sds((B, T, Hkv, D), BF16), cache(), cache(),
                sds((B, S), jnp.int32), sds((B, T), jnp.int32), sds((), jnp.int32)]
        fn = lambda q, k, v, a, b, cp, qp, li: sparse_attention_gpu(q, k, v, a, b, cp, qp, layer=li).out
        assert name in jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    S, T = 13, 3
    cache = KVCache(QuantSlots(sds((L, B, S, Hkv, D), kv), sds((L, B, S, Hkv), F32)),
                    QuantSlots(sds((L, B, S, Hkv, D), kv), sds((L, B, S, Hkv), F32)), sds((B, S), jnp.int32))
    rows, idx = sds((L, B, T, Hkv, D), BF16), sds((B, T), jnp.int32)
    text = jax.jit(cache_update_gpu, donate_argnums=0).trace(cache, rows, rows, idx, idx).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "adore_cache_update" in text


@pytest.mark.parametrize("kv", [I8, F8])
def test_gpu_cache_update_quantizes_in_place(kv):
    """The GPU update writes what write_rows writes; the slots it does not write
    keep their (NaN-poisoned) scales and their values."""
    L, B, S, Hkv, D, T = 2, 2, 13, 3, 16, 4
    ks = jax.random.split(_key(), 4)
    vals = lambda k: jax.random.randint(k, (L, B, S, Hkv, D), -127, 128).astype(kv)
    nan = jnp.full((L, B, S, Hkv), jnp.nan, F32)
    cache = KVCache(QuantSlots(vals(ks[0]), nan), QuantSlots(vals(ks[1]), nan), jnp.full((B, S), -1, jnp.int32))
    nk, nv = (jax.random.normal(k, (L, B, T, Hkv, D), F32) for k in jax.random.split(ks[2]))
    slots = jnp.array([[3, -1, 12, 0], [S + 1, 5, 6, 2]], jnp.int32)
    positions = jax.random.randint(ks[3], (B, T), 0, 100).astype(jnp.int32)
    want = write_rows(cache, nk, nv, slots, positions)
    got = run_fast(lambda *a: cache_update_gpu(*a, interpret=True), cache, nk, nv, slots, positions)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))  # NaN == NaN here


def test_tpu_kernels_refuse_8bit_slots():
    cache = KVCache.empty(1, 1, 8, 1, 16, I8)
    rows, pos = jnp.zeros((1, 1, 2, 16)), jnp.zeros((1, 1), jnp.int32)
    with pytest.raises(ValueError, match="8-bit slots"):
        sparse_attention_tpu(rows, rows[:, :, :1], rows[:, :, :1], cache.k, cache.v, cache.pos, pos, layer=0,
                             interpret=True)
    with pytest.raises(ValueError, match="8-bit slots"):
        cache_update_tpu(cache, jnp.zeros((1, 1, 1, 1, 16)), jnp.zeros((1, 1, 1, 1, 16)), jnp.zeros((1, 1), jnp.int32),
                         jnp.zeros((1, 1), jnp.int32))


def test_mixed_caches_refused():
    cache = KVCache.empty(1, 1, 8, 1, 16, I8)
    rows, pos = jnp.zeros((1, 1, 2, 16)), jnp.zeros((1, 1), jnp.int32)
    with pytest.raises(ValueError, match="both"):
        sparse_attention_gpu(rows, rows[:, :, :1], rows[:, :, :1], cache.k, jnp.zeros((1, 1, 8, 1, 16)), cache.pos, pos,
                             layer=0, interpret=True)


# ---------------------------------------------------------------- engine and policies


@pytest.fixture(scope="module")
def params():
    return tiny_params()


@pytest.fixture(scope="module")
def ctrl():
    return tiny_controller()


def test_every_policy_runs_on_int8_slots(params, ctrl):
    """Every policy (ADORE: the next test) streams through int8 slots: finite
    log-probs, the cache 8-bit at the end. H2O and TOVA read the attention of
    the dequantized keys, so near-ties among their scores may go the other way
    than with float32 slots."""
    toks = np.asarray(prompts(31, [24, 24]))
    for name in POLICIES:
        if name == "adore":
            continue
        pol = make_policy(name, None if name == "full" else 8)
        got, cache = engine.score(params, CFG, toks, 9, policy=pol, chunk=8, kv_dtype="int8")
        assert np.isfinite(got).all() and got.shape == (2, 15), name
        assert cache.quantized and cache.k.values.dtype == I8


def test_adore_release_decisions_do_not_depend_on_the_cache_dtype(params, ctrl):
    """An embedding-input controller with rebuilt rows: the positions ADORE keeps
    (its scores' top m) are the same with float32, int8 and float8_e4m3 slots,
    and the mean log-prob moves by less than 1%."""
    toks = np.asarray(prompts(32, [40, 40]))
    pol = make_policy("adore", 10, rebuild=2, controller_graphdef=ctrl[0])
    runs = [engine.score(params, CFG, toks, 20, policy=pol, policy_params=ctrl[1], chunk=8, kv_dtype=kv)
            for kv in ("auto", "int8", "float8_e4m3")]
    (ref, c0), rest = runs[0], runs[1:]
    assert not c0.quantized
    for lp, cache in rest:
        assert cache.quantized and np.isfinite(lp).all()
        np.testing.assert_array_equal(np.sort(np.asarray(cache.pos), 1), np.sort(np.asarray(c0.pos), 1))
        assert abs(lp.mean() - ref.mean()) < 0.01 * abs(ref.mean())


def test_engine_kv_dtype_errors():
    with pytest.raises(ValueError, match="unknown kv dtype"):
        engine.EngineConfig(max_new_tokens=1, prompt_len=8, chunk=8, kv_dtype="int4")


def test_cache_specs_cover_the_scales():
    """The mesh's cache specs have the cache's structure, scales split as their values."""
    from jax.sharding import PartitionSpec as P

    from adore_jax import sharding

    mesh = sharding.make_mesh({sharding.DATA: 1})
    specs = sharding.cache_specs(CFG, mesh, quantized=True)
    cache = KVCache.empty(CFG.num_layers, 2, 4, CFG.num_kv_heads, CFG.head_dim, I8)
    assert jax.tree.structure(cache) == jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P))
    assert specs.k.scale == P(*specs.k.values[:-1])
    assert jax.tree.structure(sharding.cache_specs(CFG, mesh), is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(
        KVCache.empty(CFG.num_layers, 2, 4, CFG.num_kv_heads, CFG.head_dim))


def test_bench_kernels_8bit_section_runs(tmp_path, monkeypatch):
    """python -m eval.bench_kernels --sections attn8 at tiny sizes (interpret mode,
    each op run once, not timed): a row per shape and slot count with bfloat16, int8
    and float8_e4m3 entries, bytes counted with the scales, and its lines in the table."""
    import json

    from eval import bench_kernels

    def once(op, sets, **kw):
        jax.block_until_ready(jax.jit(op)(*sets[0]))
        return 1e-3, [1e-3]

    monkeypatch.setattr(bench_kernels, "bench", once)
    out = tmp_path / "bench.json"
    bench_kernels.main(["--smoke", "--sections", "attn8", "--out", str(out)])
    [row] = json.loads(out.read_text())["attention_8bit"]
    assert row["bfloat16"]["us"] > 0
    for name in ("int8", "float8_e4m3"):
        assert row[name]["us"] > 0 and row[name]["kv_bytes"] == 2 * row["B"] * row["S"] * row["Hkv"] * (row["D"] + 4)
        assert row[name]["copy_same_size"]["us"] > 0
    assert "8-bit slots, T = 1" in (tmp_path / "bench.txt").read_text()


def test_cli_kv_dtype_names_match_the_cache():
    from adore_jax.cli import KV_DTYPE_NAMES
    from models.cache import KV_DTYPES

    assert KV_DTYPE_NAMES == ("auto", *KV_DTYPES)
