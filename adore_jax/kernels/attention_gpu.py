"""Sparse decode attention over the slot cache: GPU Pallas (Triton lowering).

Grid (B, Hkv, NS): one program per (sequence, KV head, split of the slots).
Each program loads the G * T query rows of its KV head once (rows r = t*G + g,
padded to a power of two >= 16), then streams its share of the cache K/V
straight from the cache layout [B, S, Hkv, D] (no transpose), with an online
softmax in fp32 (in base 2: softmax_gpu.py). Every block runs the same code: a
partial last block is read as the whole block ending at slot S, and the slots
it shares with the block before are masked by position (so each K/V row
counts once, and fewer than one block's rows are read twice). The plan
(`plan`, `auto_splits`) sets the block, the pipeline depth and the split count
from the rows a program has. Given `layer`, the kernel reads that layer of the
stacked [L, B, S, Hkv, D] cache itself (the index is a kernel input), so a
layer scan passes the whole cache without slicing (copying) it. The last split
also takes the T new rows. Splits are merged with their log-sum-exp either

* merge="kernel" (default): each split writes its partial (m, l, unnormalised
  o) to a small scratch output, bumps an atomic counter (after a CTA barrier;
  acq_rel), and the program that arrives last merges and writes the final
  output and lse. One launch, plus a memset of the counters.
* merge="xla": partials are returned and merged by XLA (a few small fusions).

with_stats additionally writes the masked scaled scores (fp32), from which XLA
computes the mass per slot summed over heads once the lse is known.

Limits: T <= 16, G * T <= 128, D a power of two >= 16. Longer chunks (prefill)
go to the prefill kernel (prefill_gpu.py) without statistics, and to
`blockwise_attention` with them or with another head dim. Measurements and
tuning history: docs/KERNELS.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from adore_jax.kernels import softmax_gpu
from adore_jax.kernels.blockwise import blockwise_attention
from adore_jax.kernels.common import (
    MAX_ROWS,
    MAX_T,
    cdiv,
    check_quant,
    check_shapes,
    finish,
    mass_from_scores,
    merge_partials,
    next_pow2,
    num_sms,
    round_up,
    stacked,
)
from adore_jax.kernels.prefill_gpu import PrefillConfig, prefill_attention_gpu
from models.attention import NEG_INF, AttentionOut


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Tuning knobs of the GPU kernel (static). None: the plan's choice (`plan`)."""

    block_s: Optional[int] = None  # slots per loop step; None: 32 (D >= 128) or 64 up to 16 query rows, 64 from 32
    num_warps: Optional[int] = None  # None: 2 up to 16 query rows (32 at D <= 64), else 4 (`warps`)
    num_stages: Optional[int] = None  # None: 4 (D >= 128) or 3 up to 16 query rows, 3 from 32
    splits: Optional[int] = None  # splits of S per (b, kv head); None: auto (below)
    ctas_per_sm: Optional[int] = None  # programs an SM runs side by side, in the split cost; None: 2, or 1 below the floor (plan)
    merge: str = "kernel"  # "kernel" (atomic last-arriver merge) or "xla"
    merge_loads: str = "plain"  # how the last program reads the partials: "plain" or "volatile"
    prefill: Optional[PrefillConfig] = PrefillConfig()  # chunks longer than MAX_T rows; None: blockwise_attention

    def __post_init__(self):
        if self.block_s is not None and (self.block_s < 16 or self.block_s != next_pow2(self.block_s)):
            raise ValueError(f"GpuConfig: block_s must be None or a power of two >= 16; got {self.block_s}")
        for name in ("num_warps", "num_stages", "splits", "ctas_per_sm"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"GpuConfig: {name} must be None or >= 1; got {getattr(self, name)}")
        if self.merge not in ("kernel", "xla"):
            raise ValueError(f"GpuConfig: unknown merge {self.merge!r} (kernel, xla)")
        if self.merge_loads not in ("plain", "volatile"):
            raise ValueError(f"GpuConfig: unknown merge_loads {self.merge_loads!r} (plain, volatile)")


def auto_splits(programs: int, side_by_side: int, max_splits: int, min_programs: float = 0) -> int:
    """Splits of the slots for `programs` (b, kv head) pairs on a GPU that runs
    `side_by_side` programs at once: among the split counts giving at least
    `min_programs` programs (all of them if none does), the fewest within 12% of the
    least ceil(programs * ns / side_by_side) / ns, the time of the busiest SM (a
    last partial round leaves SMs idle; docs/KERNELS.md, "Design notes")."""
    counts = [ns for ns in range(1, max_splits + 1) if programs * ns >= min_programs] or [max_splits]
    cost = {ns: cdiv(programs * ns, side_by_side) / ns for ns in counts}
    return next(ns for ns in counts if cost[ns] <= 1.12 * min(cost.values()))


def padded_rows(G: int, T: int) -> int:
    """Query rows a program holds: its G * T rows padded to a power of two >= 16."""
    return max(16, next_pow2(G * T))


def plan(B: int, Hkv: int, S: int, D: int, cfg: GpuConfig, rows: int = 16):
    """Static launch plan for `rows` (padded) query rows a program: (block_s, splits, split_len, stages).

    Up to 16 rows (T = 1, and MHA up to T = 16): small blocks in a deep pipeline
    (32 slots x 4 stages at D >= 128, 64 x 3 below), and splits only until every SM
    has about two programs (1.9), each SM counted as running one at a time, and of
    at least 5 blocks (at S = 1024, 6-block splits were 5-9% faster than 2- and
    4-block ones); where the (b, kv head) pairs alone reach that, splits as from
    32 rows. From 32 rows: 64-slot blocks, 3 stages, splits of at least 2 blocks
    counted at 2 programs an SM. Measured in docs/KERNELS.md, "Design notes"."""
    few = rows <= 16
    bs = cfg.block_s or (32 if few and D >= 128 else 64)
    stages = cfg.num_stages or (4 if few and D >= 128 else 3)
    bs = max(16, min(bs, next_pow2(S + 1) // 2))  # a power of two <= S (16 when S < 16)
    nblocks = max(1, cdiv(S, bs))
    if cfg.splits is not None:
        ns = max(1, min(cfg.splits, nblocks))
    else:
        floor = 1.9 * num_sms() if few else 0
        per_sm = cfg.ctas_per_sm or (1 if B * Hkv < floor else 2)
        ns = auto_splits(B * Hkv, per_sm * num_sms(), max(1, nblocks // (5 if few else 2)), floor)
    sp = round_up(cdiv(max(S, 1), ns), bs)
    ns = max(1, cdiv(S, sp))
    return bs, ns, sp, stages


def warps(rows: int, D: int, cfg: GpuConfig) -> int:
    """Warps a program runs for `rows` (padded) query rows of head dim D:
    cfg.num_warps, else 2 up to 16 rows, and up to 32 at D <= 64, 4 above
    (docs/KERNELS.md, "Design notes")."""
    return cfg.num_warps or (2 if rows <= 16 or (rows <= 32 and D <= 64) else 4)


def _pow2_head(D: int) -> bool:
    return D == next_pow2(D) and D >= 16


def supported(q, k) -> bool:
    """Whether the decode kernel takes these shapes."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    return T <= MAX_T and (Hq // Hkv) * T <= MAX_ROWS and _pow2_head(D)


def _load_shared(ref, mask, other, interpret, volatile):
    """Load data other programs wrote in this launch. The acq_rel atomic (plus the
    CTA barrier) orders it; volatile=True also makes each load ld.volatile."""
    if volatile and not interpret:
        try:
            return plgpu.load(ref, mask=mask, other=other, volatile=True)
        except TypeError:  # a jax without the volatile flag
            pass
    return plgpu.load(ref, mask=mask, other=other)


def merge_step(M, L, O, m, l, o):
    """The running merge (M, L [R], O [R, D]) of split partials with one more
    (m, l, o): running max, sum of exp(s - max) and unnormalised output, fp32."""
    M_new = jnp.maximum(M, m)
    a = jnp.exp(M - M_new)
    w = jnp.exp(m - M_new)
    return M_new, a * L + w * l, a[:, None] * O + w[:, None] * o


def _kernel(*refs, T, G, D, S, R, Rr, bs, Sp, NS, Tp, scale, merge, with_scores, interpret, volatile, precision,
            quant):
    lyr_ref, q_ref, qpos_ref, ck_ref, cv_ref, cpos_ref, kn_ref, vn_ref = refs[:8]
    rest = list(refs[8:])
    ks_ref, vs_ref = (rest.pop(0), rest.pop(0)) if quant else (None, None)  # 8-bit slots: scales [L, S]
    use_counter = merge == "kernel" and NS > 1
    if use_counter:
        rest.pop(0)  # counter input (aliased to an output below)
    if merge == "kernel":
        out_ref, lse_ref = rest[:2]
        rest = rest[2:]
    if merge == "xla" or use_counter:
        op_ref, mp_ref, lp_ref = rest[:3]
        rest = rest[3:]
    if use_counter:
        cnt_ref = rest.pop(0)
    sc_ref = rest.pop(0) if with_scores else None

    h = pl.program_id(1)
    j = pl.program_id(2)
    f32 = jnp.float32
    lyr = lyr_ref[0]  # layer of the stacked cache blocks [L, S, D]

    r = jnp.arange(R, dtype=jnp.int32)
    row_ok = r < Rr
    t_of_r = r // G  # >= T on padding rows: those lanes are masked
    hq_of_r = h * G + r % G
    d = jnp.arange(D, dtype=jnp.int32)
    row_ok2 = jnp.broadcast_to(row_ok[:, None], (R, D))

    q = plgpu.load(q_ref.at[t_of_r[:, None], hq_of_r[:, None], d[None, :]], mask=row_ok2, other=0)
    rpos = plgpu.load(qpos_ref.at[t_of_r], mask=row_ok, other=-1)

    def update(carry, k, v, kpos, col0, own=None, scales=(None, None)):
        carry, s = softmax_gpu.step(carry, q, k, v, kpos, rpos, scale=scale, precision=precision, interpret=interpret,
                                    k_scale=scales[0], v_scale=scales[1])
        if with_scores:
            s = softmax_gpu.natural(s)
            if own is None:
                sc_ref[:, pl.ds(col0, s.shape[1])] = s
            else:  # columns another block owns keep the scores it wrote
                plgpu.store(sc_ref.at[:, pl.ds(col0, s.shape[1])], s, mask=jnp.broadcast_to(own[None, :], s.shape))
        return carry

    carry = softmax_gpu.init(R, D)

    # The blocks of this split, one loop body for all of them: a partial last
    # block is read as the whole block that ends at slot S (overlapping the one
    # before it), its slots already counted masked out by position. So the
    # kernel's code, and with it how many programs fit on an SM, does not depend
    # on S (docs/KERNELS.md, "Design notes").
    split_start = j * Sp
    n_blocks_total = cdiv(S, bs)
    if S % Sp == 0:
        n_blocks = Sp // bs  # static: every split is full
    else:
        n_blocks = jnp.clip(n_blocks_total - split_start // bs, 0, Sp // bs)
    cols = jnp.arange(bs, dtype=jnp.int32)

    def body(i, c):
        lo = split_start + i * bs  # first slot this block owns
        if S < bs:  # a cache shorter than one block: masked loads
            ok = lo + cols < S
            ok2 = jnp.broadcast_to(ok[:, None], (bs, D))
            k = softmax_gpu.load_zeroed(ck_ref.at[lyr, pl.ds(lo, bs), :], ok2, q.dtype if quant else None)
            v = softmax_gpu.load_zeroed(cv_ref.at[lyr, pl.ds(lo, bs), :], ok2, q.dtype if quant else None)
            kpos = plgpu.load(cpos_ref.at[pl.ds(lo, bs)], mask=ok, other=-1)
            scales = (None, None)
            if quant:
                scales = tuple(plgpu.load(r.at[lyr, pl.ds(lo, bs)], mask=ok, other=0) for r in (ks_ref, vs_ref))
            return update(c, k, v, kpos, lo, scales=scales)
        start = pl.multiple_of(lo, bs) if S % bs == 0 else jnp.minimum(lo, S - bs)
        k = ck_ref[lyr, pl.ds(start, bs), :]
        v = cv_ref[lyr, pl.ds(start, bs), :]
        kpos = cpos_ref[pl.ds(start, bs)]
        scales = (ks_ref[lyr, pl.ds(start, bs)], vs_ref[lyr, pl.ds(start, bs)]) if quant else (None, None)
        own = None
        if S % bs:
            own = start + cols >= lo
            kpos = jnp.where(own, kpos, -1)
        return update(c, k, v, kpos, start, own, scales)

    carry = lax.fori_loop(0, n_blocks, body, carry)

    # The T new rows, in the last split.
    def do_new(c):
        tn = jnp.arange(Tp, dtype=jnp.int32)
        ok = tn < T
        ok2 = jnp.broadcast_to(ok[:, None], (Tp, D))
        kn = plgpu.load(kn_ref.at[tn[:, None], d[None, :]], mask=ok2, other=0)
        vn = plgpu.load(vn_ref.at[tn[:, None], d[None, :]], mask=ok2, other=0)
        knpos = plgpu.load(qpos_ref.at[tn], mask=ok, other=-1)
        return update(c, kn, vn, knpos, NS * Sp)

    carry = lax.cond(j == NS - 1, do_new, lambda c: c, carry)
    o, m, l = carry
    m = softmax_gpu.natural(m)

    def store_final(o, m, l):
        lc = jnp.maximum(l, 1e-30)
        out = (o / lc[:, None]).astype(out_ref.dtype)
        plgpu.store(out_ref.at[t_of_r[:, None], hq_of_r[:, None], d[None, :]], out, mask=row_ok2)
        plgpu.store(lse_ref.at[t_of_r, hq_of_r], m + jnp.log(lc), mask=row_ok)

    if merge == "kernel" and NS == 1:
        store_final(o, m, l)
        return

    # Partials: rows r < Rr of split j.
    plgpu.store(op_ref.at[j, r[:, None], d[None, :]], o, mask=row_ok2)
    plgpu.store(mp_ref.at[j, r], m, mask=row_ok)
    plgpu.store(lp_ref.at[j, r], l, mask=row_ok)
    if merge == "xla":
        return

    # Last-arriving split merges (threadfence-reduction pattern): every thread's
    # partial stores complete before the barrier; the acq_rel atomic publishes
    # them; the last program reads them back.
    if not interpret and hasattr(plgpu, "debug_barrier"):
        plgpu.debug_barrier()
    prev = plgpu.atomic_add(cnt_ref, (jnp.int32(0) + 0 * j,), jnp.int32(1))

    @pl.when(prev == NS - 1)
    def _():
        M = jnp.full((R,), NEG_INF, f32)
        L = jnp.zeros((R,), f32)
        O = jnp.zeros((R, D), f32)
        for jj in range(NS):
            mj = _load_shared(mp_ref.at[jj, r], row_ok, NEG_INF, interpret, volatile)
            lj = _load_shared(lp_ref.at[jj, r], row_ok, 0.0, interpret, volatile)
            oj = _load_shared(op_ref.at[jj, r[:, None], d[None, :]], row_ok2, 0.0, interpret, volatile)
            M, L, O = merge_step(M, L, O, mj, lj, oj)
        store_final(O, M, L)


def sparse_attention_gpu(
    q,
    k,
    v,
    cache_k,
    cache_v,
    cache_pos,
    q_pos,
    *,
    layer=None,
    with_stats: bool = False,
    scale: Optional[float] = None,
    interpret: bool = False,
    config: GpuConfig = GpuConfig(),
) -> AttentionOut:
    """Same signature and outputs as `reference_attention` (GPU Pallas/Triton).
    8-bit slots (models.cache.QuantSlots, both caches alike): the kernels load
    the values and their scales and dequantize in registers."""
    B, T, Hq, Hkv, G, D, S = check_shapes(q, k, v, cache_k, cache_v, cache_pos, q_pos, layer)
    quant = check_quant(cache_k, cache_v)
    scale = D**-0.5 if scale is None else float(scale)
    decode = supported(q, k)
    prefill = not decode and _pow2_head(D) and not with_stats and config.prefill is not None  # a long chunk
    if S == 0 or not (decode or prefill):
        return blockwise_attention(q, k, v, cache_k, cache_v, cache_pos, q_pos, layer=layer, with_stats=with_stats,
                                   scale=scale)
    cache_k, cache_v, layer = stacked(cache_k, cache_v, layer)
    scales = [cache_k.scale, cache_v.scale] if quant else []
    if quant:
        cache_k, cache_v = cache_k.values, cache_v.values
    if prefill:
        return AttentionOut(prefill_attention_gpu(q, k, v, cache_k, cache_v, cache_pos, q_pos, layer, scale=scale,
                                                  interpret=interpret, config=config.prefill, scales=scales))
    L = cache_k.shape[0]
    Rr = G * T
    R = padded_rows(G, T)
    bs, NS, Sp, stages = plan(B, Hkv, S, D, config, R)
    Tp = max(16, next_pow2(T))
    merge = config.merge
    use_counter = merge == "kernel" and NS > 1
    cache_pos = cache_pos.astype(jnp.int32)
    q_pos = q_pos.astype(jnp.int32)
    f32 = jnp.float32

    in_specs = [
        pl.BlockSpec((1,), lambda b, h, j: (0,)),  # layer
        pl.BlockSpec((None, T, Hq, D), lambda b, h, j: (b, 0, 0, 0)),  # q
        pl.BlockSpec((None, T), lambda b, h, j: (b, 0)),  # q_pos
        pl.BlockSpec((L, None, S, None, D), lambda b, h, j: (0, b, 0, h, 0)),  # cache_k (all layers)
        pl.BlockSpec((L, None, S, None, D), lambda b, h, j: (0, b, 0, h, 0)),  # cache_v
        pl.BlockSpec((None, S), lambda b, h, j: (b, 0)),  # cache_pos
        pl.BlockSpec((None, T, None, D), lambda b, h, j: (b, 0, h, 0)),  # k (new rows)
        pl.BlockSpec((None, T, None, D), lambda b, h, j: (b, 0, h, 0)),  # v (new rows)
    ]
    args = [layer, q, q_pos, cache_k, cache_v, cache_pos, k, v]
    for sc in scales:  # 8-bit slots: the scales of this (b, kv head), all layers
        in_specs.append(pl.BlockSpec((L, None, S, None), lambda b, h, j: (0, b, 0, h)))
        args.append(sc)
    out_shape, out_specs = [], []
    aliases = {}
    if use_counter:
        counter_arg = len(args)
        in_specs.append(pl.BlockSpec((None, None, 1), lambda b, h, j: (b, h, 0)))
        args.append(jnp.zeros((B, Hkv, 1), jnp.int32))
    if merge == "kernel":
        out_shape += [jax.ShapeDtypeStruct((B, T, Hq, D), q.dtype), jax.ShapeDtypeStruct((B, T, Hq), f32)]
        out_specs += [
            pl.BlockSpec((None, T, Hq, D), lambda b, h, j: (b, 0, 0, 0)),
            pl.BlockSpec((None, T, Hq), lambda b, h, j: (b, 0, 0)),
        ]
    if merge == "xla" or use_counter:
        out_shape += [
            jax.ShapeDtypeStruct((B, Hkv, NS, Rr, D), f32),
            jax.ShapeDtypeStruct((B, Hkv, NS, Rr), f32),
            jax.ShapeDtypeStruct((B, Hkv, NS, Rr), f32),
        ]
        out_specs += [
            pl.BlockSpec((None, None, NS, Rr, D), lambda b, h, j: (b, h, 0, 0, 0)),
            pl.BlockSpec((None, None, NS, Rr), lambda b, h, j: (b, h, 0, 0)),
            pl.BlockSpec((None, None, NS, Rr), lambda b, h, j: (b, h, 0, 0)),
        ]
    if use_counter:
        aliases[counter_arg] = len(out_shape)
        out_shape.append(jax.ShapeDtypeStruct((B, Hkv, 1), jnp.int32))
        out_specs.append(pl.BlockSpec((None, None, 1), lambda b, h, j: (b, h, 0)))
    W = NS * Sp + Tp
    if with_stats:
        out_shape.append(jax.ShapeDtypeStruct((B, Hkv, R, W), f32))
        out_specs.append(pl.BlockSpec((None, None, R, W), lambda b, h, j: (b, h, 0, 0)))

    kernel = functools.partial(
        _kernel, T=T, G=G, D=D, S=S, R=R, Rr=Rr, bs=bs, Sp=Sp, NS=NS, Tp=Tp, scale=scale,
        merge=merge, with_scores=with_stats, interpret=bool(interpret), volatile=config.merge_loads == "volatile",
        quant=quant,
        # fp32 inputs: full fp32 dots (Triton's default for fp32 is TF32)
        precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(B, Hkv, NS),
        in_specs=in_specs,
        out_specs=out_specs,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=warps(R, D, config), num_stages=stages),
        interpret=interpret,
        name="adore_sparse_attention",
    )(*args)
    outs = list(outs)
    if merge == "kernel":
        out, lse = outs[:2]
    else:
        o_p, m_p, l_p = outs[:3]
        out, lse = merge_partials(o_p, m_p, l_p, T, G, q.dtype)
    mass = None
    if with_stats:
        sc = outs[-1][:, :, :Rr]
        sc = jnp.concatenate([sc[..., :S], sc[..., NS * Sp : NS * Sp + T]], axis=-1)
        mass = mass_from_scores(sc, lse, T, G)
    return finish(out, lse, mass, with_stats)
