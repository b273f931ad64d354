"""Decode throughput and memory: ADORE against full attention and HF transformers.

    python -m eval.throughput --preset gpu --out results/throughput      # the H200 run
    adore bench                                                          # small, any device

Decode steps run from a synthetic decode state (cache filled with random K/V at
valid positions, history and controller state random): throughput depends on
shapes, not values, and this skips a long prefill per row. Time to first token
is measured with a real prefill. Each row reports tokens/s (median of timed
chunks after compile), the bytes a step must read (weights once + every valid
KV row once + ADORE's history keys) over the measured copy bandwidth (the
roofline), and the fraction of it reached. HF transformers (torch, same GPU,
same shapes, random weights) is the external reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from adore_jax import engine
from adore_jax.policies import build_policy, make_policy
from adore_jax.sampling import SamplingParams
from adore_jax.sharding import make_mesh, parse_mesh
from eval.bandwidth import copy_bandwidth
from eval.throughput_report import write_report
from models.attention import AttentionOut, layer_cache
from models.cache import KVCache, QuantSlots, is_quantized, kv_dtype, slot_bytes
from models.llama import LAYOUTS, LlamaConfig, Params, default_layout, init_params, with_layout
from models.loading import place_params
from models.shapes import SHAPES

@dataclasses.dataclass(frozen=True)
class Row:
    """One benchmark row: a model shape, a policy and its settings, batch and context."""
    shape: str
    policy: str  # full | streaming | adore
    batch: int
    context: int
    cache_size: int = 1024
    rebuild: int = 0
    rebuild_every: int = 1
    variant: str = ""  # "" | no-attention | no-update (step breakdown) | sliced-cache | stacked | unstacked (layers)
    #                    | xla-matmul (the projections by XLA's matmul, not the few-row kernel)
    feature: str = ""  # adore: the controller's input, "hidden:l" (a random controller reading layer l's input);
    #                    "" the shape's default controller (the packaged one, else random on the embeddings)
    mesh: str = ""  # "data=d,model=m": the engine's steps under shard_map on this mesh (adore_jax.sharding);
    #                 "" one device, no mesh
    kv_dtype: str = ""  # the cache slots (EngineConfig.kv_dtype): "" the weights' dtype, "int8", "float8_e4m3"

    @property
    def name(self) -> str:
        p = self.policy if self.policy == "full" else f"{self.policy} m={self.cache_size}"
        if self.policy == "adore":
            p += f" R={self.rebuild}" + (f"/{self.rebuild_every}" if self.rebuild_every > 1 else "")
            p += f" {self.feature}" if self.feature else ""
        return p + (f" [{self.variant}]" if self.variant else "") + (f" [mesh {self.mesh}]" if self.mesh else "") + (
            f" [kv {self.kv_dtype}]" if self.kv_dtype else "")


def row_policy(row: Row, cfg: LlamaConfig):
    """(policy, policy params) a row runs: build_policy's, or for `feature` a random
    controller with that input."""
    m = None if row.policy == "full" else row.cache_size
    if not row.feature:
        return build_policy(row.policy, cfg, m, rebuild=row.rebuild, rebuild_every=row.rebuild_every)[:2]
    from flax import nnx

    from adore_jax.controller import feature_layer, new_controller

    layer = feature_layer(row.feature)
    gd, state = nnx.split(new_controller(cfg.hidden_size, feature_layer=layer))
    return make_policy(row.policy, m, controller_graphdef=gd, feature_layer=layer, rebuild=row.rebuild,
                       rebuild_every=row.rebuild_every), state


def _no_attention(q, k, v, cache_k, cache_v, cache_pos, q_pos, *, layer=None, with_stats=False, scale=None):
    """Breakdown variant: attention replaced by the query itself."""
    return AttentionOut(q)


def _sliced_cache(attn_fn):
    """Comparison variant: the layer's cache sliced out before the kernel call
    (how the layer scan passed it before the kernels took the layer index)."""

    def fn(q, k, v, cache_k, cache_v, cache_pos, q_pos, *, layer=None, with_stats=False, scale=None):
        ck, cv = layer_cache(cache_k, cache_v, layer)
        return attn_fn(q, k, v, ck, cv, cache_pos, q_pos, with_stats=with_stats, scale=scale)

    return fn


def _no_update(cache, new_k, new_v, slots, positions):
    return cache


def synthetic_state(params, pp, cfg, ec: engine.EngineConfig, batch: int, context: int, key) -> engine.DecodeState:
    """A decode state as if `context` tokens had been processed: valid slots hold
    the most recent positions with random K/V; float policy state is random."""
    slots = ec.policy.num_slots(ec.max_total)
    dtype = kv_dtype(ec.kv_dtype, params.embed.dtype)
    k1, k2, k3 = jax.random.split(key, 3)
    shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
    held = min(slots, context)
    pos = jnp.where(jnp.arange(slots) < held, context - held + jnp.arange(slots), -1).astype(jnp.int32)
    cache = KVCache(random_slots(k1, shape, dtype), random_slots(k2, shape, dtype), jnp.broadcast_to(pos, (batch, slots)))
    pstate = ec.policy.init(pp, batch, ec.max_total)
    leaves, tree = jax.tree_util.tree_flatten(pstate)
    keys = jax.random.split(k3, max(len(leaves), 1))
    leaves = [jax.random.normal(kk, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
              for kk, x in zip(keys, leaves)]
    pstate = jax.tree_util.tree_unflatten(tree, leaves)
    n = ec.max_new_tokens
    last = jax.random.randint(k3, (batch,), 0, cfg.vocab_size, jnp.int32)
    return engine.DecodeState(cache, pstate, last, jnp.full((batch,), context, jnp.int32), jnp.zeros((batch,), bool),
                              jnp.zeros((batch, n), jnp.int32), jnp.int32(1), jax.random.key(1))


def random_slots(key, shape, dtype):
    """Random K or V rows [L, B, S, Hkv, D] of the cache dtype: normal values, or for
    8-bit slots (QuantSlots) random values in one jitted program (no wider copy of
    the cache) and scales of about 1/127."""
    if not is_quantized(dtype):
        return jax.random.normal(key, shape, dtype)
    k1, k2 = jax.random.split(key)
    values = jax.jit(lambda k: jnp.clip(jax.random.normal(k, shape, jnp.bfloat16) * 32, -127, 127).astype(dtype))(k1)
    return QuantSlots(values, jax.random.uniform(k2, shape[:-1], jnp.float32, 0.5 / 127, 1.5 / 127))


def random_params(cfg: LlamaConfig, dtype) -> Params:
    """Random weights in the default layer layout, made on the device and placed
    again from the host (`place_params`): unstacked on the device, they left a
    12 GiB hole that the largest fixed-budget caches did not fit around."""
    return place_params(cfg, jax.device_get(init_params(cfg, jax.random.key(0), dtype)))


def step_bytes(cfg: LlamaConfig, params, row: Row, itemsize: int) -> int:
    """Bytes one decode step must read: weights once, every valid KV row once (with
    its scales for 8-bit slots), history keys."""
    weights = sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    weights -= cfg.vocab_size * cfg.hidden_size * itemsize  # embedding: one row per token, not the table
    if cfg.tie_word_embeddings:
        weights += cfg.vocab_size * cfg.hidden_size * itemsize  # ...but the tied head reads it whole
    kv = min(row.context, row.cache_size if row.policy != "full" else row.context)
    hist = (row.context * 64 * 4) if row.policy == "adore" else 0
    per_slot = slot_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, row_kv_dtype(row, itemsize))
    return weights + row.batch * (kv * per_slot + hist)


def row_kv_dtype(row: Row, itemsize: int):
    """The cache dtype of a row: its kv_dtype, else the weights' (itemsize 2: bfloat16, 4: float32)."""
    return kv_dtype(row.kv_dtype or "auto", jnp.bfloat16 if itemsize == 2 else jnp.float32)


def row_kernels(row: Row, kernels):
    """(attention, cache update, matmul_fn) a row runs with: the kernels given, with
    the one its variant leaves out or changes replaced."""
    attn_fn, update_fn, matmul_fn = kernels
    if row.variant == "xla-matmul":
        matmul_fn = None
    if row.variant == "no-attention":
        attn_fn = _no_attention
    if row.variant == "sliced-cache":
        attn_fn = _sliced_cache(attn_fn)
    if row.variant == "no-update":
        update_fn = _no_update
    return attn_fn, update_fn, matmul_fn


def _program(cfg, params, row: Row, steps: int, repeats: int, kernels):
    """(compiled decode chunk of `steps` steps, policy params, its input state) for a
    row. params may be abstract (jax.ShapeDtypeStruct leaves): then so is the state,
    and nothing is allocated."""
    attn_fn, update_fn, matmul_fn = row_kernels(row, kernels)
    pol, pp = row_policy(row, cfg)
    mesh = make_mesh(row.mesh) if row.mesh else None
    ec = engine.EngineConfig(max_new_tokens=steps * (repeats + 2) + 2, prompt_len=row.context, chunk=512,
                             policy=pol, attn_fn=attn_fn, cache_update=update_fn, matmul_fn=matmul_fn, mesh=mesh,
                             kv_dtype=row.kv_dtype or "auto")
    engine.check_mesh(ec, cfg, row.batch)
    state = lambda p: synthetic_state(p, pp, cfg, ec, row.batch, row.context, jax.random.key(0))
    abstract = isinstance(jax.tree_util.tree_leaves(params)[0], jax.ShapeDtypeStruct)
    s = jax.eval_shape(state, params) if abstract else state(params)
    run = engine._decode_chunk_jit.lower(params, pp, cfg, ec, s, SamplingParams().validate(), steps).compile()
    return run, pp, s


def _row_of(result: dict) -> Row:
    """The Row a result line (rows.jsonl, throughput.json) was measured for (fields it
    predates: their defaults)."""
    return Row(**{f.name: result.get(f.name, f.default) for f in dataclasses.fields(Row)})


def _file_name(row: Row) -> str:
    return f"{row.shape}_{row.name}_B{row.batch}_{row.context}".replace(" ", "_").replace("/", "-")


def program_peak_bytes(run) -> int:
    """A compiled program's own peak: its arguments (weights, state), outputs not
    aliased to them, and temporaries."""
    ma = run.memory_analysis()
    return ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes


def time_decode_chunks(run, params, pp, s, sp, steps: int, repeats: int) -> tuple[float, dict]:
    """(seconds per decode step: the median over `repeats` runs of a compiled chunk
    of `steps` steps, after one warm run; the device's memory stats after warming)."""
    s = run(params, pp, s, sp)
    jax.block_until_ready(s)
    mem = jax.devices()[0].memory_stats() or {}
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        s = run(params, pp, s, sp)
        jax.block_until_ready(s.out)
        ts.append((time.perf_counter() - t) / steps)
    return float(np.median(ts)), mem


def row_params(cfg, params, row: Row):
    """The weights a row runs with: in the other layer layout for a layout variant (a
    second copy, for this row), placed on the row's mesh (split over its model axis)."""
    if row.variant in LAYOUTS:
        params = with_layout(params, row.variant)
    if row.mesh:
        layers = "unstacked" if isinstance(params.layers, tuple) else "stacked"
        params = place_params(cfg, params, make_mesh(row.mesh), layers)
    return params


def measure_row(cfg, params, row: Row, steps: int, repeats: int, kernels, hlo_dir: Optional[Path] = None) -> dict:
    """Time one row; hlo_dir: also write the compiled (optimized) program's HLO text there."""
    params = row_params(cfg, params, row)
    run, pp, s = _program(cfg, params, row, steps, repeats, kernels)
    sp = SamplingParams().validate()
    if hlo_dir is not None:
        hlo_dir.mkdir(parents=True, exist_ok=True)
        (hlo_dir / f"{_file_name(row)}.hlo.txt").write_text(run.as_text())
    step, mem = time_decode_chunks(run, params, pp, s, sp, steps, repeats)
    ma = run.memory_analysis()
    return {"step_ms": step * 1e3, "tokens_per_s": row.batch / step, "peak_gb": program_peak_bytes(run) / 1e9,
            "program_temp_gb": ma.temp_size_in_bytes / 1e9,
            "device_bytes_in_use_gb": mem.get("bytes_in_use", 0) / 1e9}


def prefill_program(cfg, params, row: Row, kernels, prefill_group: Optional[int] = None):
    """(compiled prefill of `context` tokens per sequence, its arguments) for a row;
    prefill_group: sequences prefilled at a time (EngineConfig.prefill_group)."""
    pol, pp = row_policy(dataclasses.replace(row, rebuild_every=1), cfg)
    ec = engine.EngineConfig(max_new_tokens=2, prompt_len=row.context, chunk=min(512, row.context), policy=pol,
                             attn_fn=kernels[0], cache_update=kernels[1], matmul_fn=kernels[2],
                             prefill_group=prefill_group, mesh=make_mesh(row.mesh) if row.mesh else None,
                             kv_dtype=row.kv_dtype or "auto")
    engine.check_mesh(ec, cfg, row.batch)
    params = row_params(cfg, params, row)
    toks = jax.random.randint(jax.random.key(2), (row.batch, row.context), 0, cfg.vocab_size, jnp.int32)
    lens = jnp.full((row.batch,), row.context, jnp.int32)
    run = engine._prefill_jit.lower(params, pp, cfg, ec, toks, lens, jax.random.key(0), SamplingParams().validate()).compile()
    return run, (params, pp, toks, lens, jax.random.key(0), SamplingParams().validate())


def ttft_kernels(kernels, blockwise: bool = False) -> dict:
    """{result field: (attention, update, matmul)} a TTFT row is timed with: the kernels
    given, and where they are the GPU kernels (whose prefill kernel takes the
    chunks) and `blockwise`, also XLA's blockwise_attention (`ttft_blockwise_s`),
    its reference."""
    from adore_jax.kernels import GpuConfig, get_attention_fn

    out = {"ttft_s": kernels}
    if blockwise and kernels[0].backend == "pallas_gpu":
        out["ttft_blockwise_s"] = (get_attention_fn("pallas_gpu", gpu_config=GpuConfig(prefill=None)), *kernels[1:])
    return out


def wants_ttft(row: Row) -> bool:
    """Whether --ttft times this row's prefill: full and adore (R = 0) rows up to
    TTFT_MAX_BATCH (streaming and the rebuild variants prefill as adore does)."""
    return not row.variant and not row.rebuild and row.policy != "streaming" and row.batch <= TTFT_MAX_BATCH


def time_to_first_token(run, args) -> float:
    """Seconds for one run of a compiled prefill (after a first run)."""
    jax.block_until_ready(run(*args))
    t = time.perf_counter()
    jax.block_until_ready(run(*args))
    return time.perf_counter() - t


def hf_model(cfg: LlamaConfig, device: str = "cuda"):
    """HF transformers' LlamaForCausalLM of this shape with random weights (bf16 on
    CUDA, fp32 elsewhere), in eval mode on `device`."""
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    hf_cfg = HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                      max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings)
    with torch.device(device):
        return LlamaForCausalLM(hf_cfg).to(torch.bfloat16 if device == "cuda" else torch.float32).eval()


def hf_step_ms(model, batch: int, context: int, steps: int = 8, static: bool = False) -> float:
    """HF transformers (torch, sdpa, no torch.compile) ms per decode step (median)
    after a prefill of `context` random tokens; static=True uses a StaticCache."""
    import torch
    from transformers import StaticCache

    device = model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # the cache's name, as argument and output field: `past_key_values` (5.17 on the GPU machine), `cache` (5.24 here)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    past = StaticCache(config=model.config, max_cache_len=context + steps + 2) if static else None
    with torch.no_grad():
        out = model(ids, **{name: past}, use_cache=True, cache_position=torch.arange(context, device=device),
                    logits_to_keep=1)
        past, nxt = getattr(out, name), out.logits[:, -1:].argmax(-1)
        del out, ids
        ts = []
        for i in range(steps + 2):
            sync()
            t = time.perf_counter()
            pos = torch.tensor([context + i], device=device)
            out = model(nxt, **{name: past}, use_cache=True, cache_position=pos)
            nxt = out.logits[:, -1:].argmax(-1)
            sync()
            ts.append(time.perf_counter() - t)
            past = getattr(out, name)
    del past, out
    return float(np.median(ts[2:])) * 1e3


HF_MAIN = (("llama2-7b", 8, 16384), ("smollm2-135m", 64, 8192))  # the main rows' HF points


def hf_points(shapes_batches_contexts) -> list[tuple]:
    """(shape, batch, context, static) for each point, dynamic then static cache."""
    return [(shape, B, ctx, static) for shape, B, ctx in shapes_batches_contexts for static in (False, True)]


def hf_reference(points, device: str = "cuda", done=(), save=None) -> list[dict]:
    """HF transformers step times at (shape, batch, context, static) points; one
    model per shape. A point that fails (out of memory) is recorded with its error.
    Rows in `done` are kept and their points skipped; save(rows) is called after
    each new row. [] where torch has no `device`."""
    try:
        import torch
    except ImportError:
        return []
    if device == "cuda" and not torch.cuda.is_available():
        return []
    key = lambda r: (r["shape"], r["batch"], r["context"], r["cache"])
    hf, model, model_shape = list(done), None, None
    have = {key(r) for r in hf}
    for shape, B, ctx, static in points:
        row = {"shape": shape, "batch": B, "context": ctx, "cache": "static" if static else "dynamic"}
        if key(row) in have:
            continue
        if shape != model_shape:
            model = None
            if device == "cuda":
                torch.cuda.empty_cache()
            model, model_shape = hf_model(SHAPES[shape], device), shape
        try:
            row["step_ms"] = hf_step_ms(model, B, ctx, static=static)
        except Exception as e:  # e.g. out of memory: recorded in the table
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if device == "cuda":
            torch.cuda.empty_cache()
        hf.append(row)
        print(json.dumps(row), flush=True)
        if save is not None:
            save(hf)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return hf


def preset_rows(preset: str) -> list[Row]:
    """The rows of --preset tiny (smoke test), cpu (layer layouts), gpu (the main 7B and SmolLM2 rows),
    controller (the controller's and the cache update's cost per controller input, 7B shape) or
    kvquant (full and ADORE m=1024 at the 7B shape with each cache dtype of KVQUANT_DTYPES)."""
    if preset == "tiny":
        return [Row("tiny", p, 2, 256, cache_size=64, rebuild=r) for p, r in (("full", 0), ("streaming", 0), ("adore", 0), ("adore", 4))] + [
            Row("tiny", "full", 2, 256, variant="no-attention"), Row("tiny", "adore", 2, 256, cache_size=64, variant="no-update"),
            Row("tiny", "full", 2, 256, variant="sliced-cache"), Row("tiny", "adore", 2, 256, cache_size=64, variant="unstacked"),
            Row("tiny", "adore", 2, 256, cache_size=64, variant="stacked"),
            Row("tiny", "adore", 2, 256, cache_size=64, feature="hidden:1")]
    main = dict(shape="llama2-7b", batch=8, context=16384)
    if preset == "kvquant":
        return [Row(policy=p, kv_dtype=kv, **main) for kv in KVQUANT_DTYPES for p in ("full", "adore")]
    if preset == "controller":  # the controller's cost: adore R=0 against streaming, per input; the update's: R=8 without it
        return [Row(policy="full", **main), Row(policy="streaming", **main)] + [
            Row(policy="adore", rebuild=R, feature=f, variant=v, **main)
            for f in ("", "hidden:8") for R, v in ((0, ""), (8, ""), (8, "no-update"))]
    if preset == "cpu":  # the scan over stacked layers against per-layer weight buffers, at a CPU size
        small = dict(shape="smollm2-135m", batch=4, context=2048)
        return [Row(policy=p, variant=v, **small) for p in ("full", "adore") for v in LAYOUTS]
    rows = [Row("smollm2-135m", "full", 64, 8192), Row("smollm2-135m", "adore", 64, 8192, rebuild=8)]
    rows += [Row(policy="full", **main), Row(policy="streaming", **main), Row(policy="adore", **main),
             Row(policy="adore", rebuild=8, **main), Row(policy="adore", rebuild=8, rebuild_every=REBUILD_EVERY, **main),
             Row(policy="full", variant="no-attention", **main), Row(policy="adore", rebuild=8, variant="no-attention", **main),
             Row(policy="adore", rebuild=8, variant="no-update", **main),
             Row(policy="full", variant="xla-matmul", **main), Row(policy="adore", variant="xla-matmul", **main),
             Row(policy="full", variant="sliced-cache", **main), Row(policy="adore", variant="sliced-cache", **main),
             Row(policy="full", variant="stacked", **main), Row(policy="adore", variant="stacked", **main)]
    return rows


REBUILD_EVERY = 8  # the "R=8/8" rows' rebuild period: --steps must be a multiple of it
KVQUANT_DTYPES = ("", "int8", "float8_e4m3")  # --preset kvquant: the weights' dtype (bfloat16 on GPU), 8-bit slots
TTFT_MAX_BATCH = 64  # --ttft: larger batches would prefill for minutes (B=160 x 16K at 7B: ~35 PFLOP)
GRID_CONTEXTS = (2048, 8192, 16384, 32768)
GRID_BATCHES = (1, 8, 16, 64)


def grid_rows(shapes, hbm_bytes: float, itemsize: int, contexts=GRID_CONTEXTS, batches=GRID_BATCHES) -> list[Row]:
    """Contexts x batches x policies (default {2K, 8K, 16K, 32K} x {1, 8, 16, 64}),
    where weights + KV + history fit in 85% of device memory."""
    rows = []
    for shape in shapes:
        cfg = SHAPES[shape]
        weights = (cfg.num_layers * (cfg.hidden_size * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
                                     + 3 * cfg.hidden_size * cfg.intermediate_size) + 2 * cfg.vocab_size * cfg.hidden_size) * itemsize
        for ctx in contexts:
            for B in batches:
                for policy, R, k in (("full", 0, 1), ("streaming", 0, 1), ("adore", 0, 1), ("adore", 8, 1), ("adore", 8, REBUILD_EVERY)):
                    held = ctx if policy == "full" else min(ctx, 1024)
                    need = weights + B * (held * cfg.kv_bytes_per_token * itemsize + (ctx * 264 if policy == "adore" else 0))
                    if need <= 0.85 * hbm_bytes:
                        rows.append(Row(shape, policy, B, ctx, rebuild=R, rebuild_every=k))
    return rows


FIXED_BUDGET_STEPS = {"full": 1, "adore": 8}  # the fixed-budget policies and their batch granularity


def smaller_fixed_budget_row(row: Row) -> Optional[Row]:
    """The next batch to try after `row` ran out of memory at run time (80% of it,
    in the policy's steps), or None when there is none."""
    step = FIXED_BUDGET_STEPS[row.policy]
    batch = int(row.batch * 0.8) // step * step
    return dataclasses.replace(row, batch=batch) if 0 < batch < row.batch else None


def fixed_budget_rows(cfg, dtype, limit_bytes: float, steps: int, repeats: int, kernels,
                      context: int = 16384, shape: str = "llama2-7b", kv: str = "") -> list[Row]:
    """The largest batch each policy (full; adore m=1024 R=0) fits at `context` with
    cache dtype `kv` (Row.kv_dtype): from the bytes of weights + KV + history, then
    lowered until the compiled decode program's peak (abstract inputs, nothing
    allocated) is within 95% of limit_bytes."""
    itemsize = jnp.dtype(dtype).itemsize
    params = jax.eval_shape(lambda: with_layout(init_params(cfg, jax.random.key(0), dtype)))
    weights = sum(x.size for x in jax.tree_util.tree_leaves(params)) * itemsize
    per_slot = slot_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_dtype(kv or "auto", dtype))
    per_seq = {"full": context * per_slot, "adore": 1024 * per_slot + context * (64 * 4 + 8)}
    rows = []
    for policy, step in FIXED_BUDGET_STEPS.items():
        batch = int((0.9 * limit_bytes - weights) // per_seq[policy]) // step * step
        while batch > 0:
            row = Row(shape, policy, batch, context, kv_dtype=kv)
            run = _program(cfg, params, row, steps, repeats, kernels)[0]
            if program_peak_bytes(run) <= 0.95 * limit_bytes:
                break
            batch = int(batch * 0.95) // step * step
        if batch > 0:
            rows.append(Row(shape, policy, batch, context, kv_dtype=kv))
    return rows


RESULT_ENV = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR")


def command_line(argv: list[str], environ=os.environ) -> str:
    """The command as it ran, with the environment settings that change what it measures."""
    env = [f"{k}={shlex.quote(environ[k])}" for k in RESULT_ENV if k in environ]
    return " ".join([*env, "python -m eval.throughput", *map(shlex.quote, argv)])


def main(argv=None) -> int:
    """`python -m eval.throughput`: time the preset's rows (and HF, the fixed budget, TTFT) and write the report; exit status."""
    p = argparse.ArgumentParser(prog="python -m eval.throughput")
    p.add_argument("--preset", choices=("tiny", "cpu", "gpu", "controller", "kvquant", "grid"), default="tiny",
                   help="tiny: smoke test; cpu: SmolLM2 shape, stacked vs unstacked layers; gpu: the main 7B rows; "
                        "controller: the controller's and the cache update's cost at the 7B shape, per controller "
                        "input; kvquant: full and adore at the 7B shape with bfloat16, int8 and float8_e4m3 "
                        "slots (with --fixed-budget: the largest batch of each); grid: contexts x batches x policies")
    p.add_argument("--shapes", default="smollm2-135m,llama2-7b", help="grid: comma-separated shapes")
    p.add_argument("--contexts", default=",".join(map(str, GRID_CONTEXTS)), help="grid: comma-separated context lengths")
    p.add_argument("--batches", default=",".join(map(str, GRID_BATCHES)), help="grid: comma-separated batch sizes")
    p.add_argument("--out", default="results/throughput")
    p.add_argument("--steps", type=int, default=16, help="decode steps per timed chunk")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    p.add_argument("--hf-only", action="store_true", help="the transformers reference alone (grid: at every point)")
    p.add_argument("--fixed-budget", action="store_true", help="also the largest batch per policy at 16K (7B)")
    p.add_argument("--hlo", action="store_true", help="also write each row's optimized HLO to OUT/hlo/")
    p.add_argument("--ttft", action="store_true", help=f"also time a real prefill (time to first token), B <= {TTFT_MAX_BATCH}")
    p.add_argument("--ttft-blockwise", action="store_true",
                   help="--ttft on GPU: also time each prefill through XLA's blockwise attention (the kernel's reference)")
    p.add_argument("--ttft-only", action="store_true", help="time the prefills alone, not the decode (implies --ttft)")
    p.add_argument("--prefill-group", type=int, default=None,
                   help="--ttft: prefill at most this many sequences at a time (default: the whole batch)")
    p.add_argument("--mesh", default="",
                   help="also time every row without a variant on this mesh, e.g. data=1,model=1 (docs/SERVING.md)")
    args = p.parse_args(argv)
    try:
        parse_mesh(args.mesh)
    except ValueError as e:
        p.error(str(e))
    if args.prefill_group is not None and args.prefill_group < 1:
        p.error(f"--prefill-group must be >= 1, got {args.prefill_group}")
    if args.hf_only and (args.no_hf or args.ttft_only):
        p.error("--hf-only excludes --no-hf and --ttft-only")
    if args.hf_only and args.preset not in ("gpu", "grid"):
        p.error(f"--hf-only: the {args.preset} preset has no transformers reference (gpu and grid have)")
    if args.preset in ("gpu", "grid") and args.steps % REBUILD_EVERY:
        p.error(f"--steps must be a multiple of {REBUILD_EVERY} with the {args.preset} preset: its R={REBUILD_EVERY}/"
                f"{REBUILD_EVERY} rows would otherwise rebuild at another rate in each timed chunk")
    args.ttft = args.ttft or args.ttft_only
    ints = lambda text: [int(x) for x in text.split(",") if x.strip()]
    from adore_jax.kernels import get_attention_fn, get_cache_update_fn, get_matmul_fn

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hf_done = out / "hf.json"  # the reference rows so far: a resumed run skips them
    hf = []
    if not args.no_hf:  # first: torch frees its memory before JAX takes the GPU. The grid: every point, memory permitting
        points = [(s, B, c) for s in args.shapes.split(",") for c in ints(args.contexts) for B in ints(args.batches)]
        hf = hf_reference(hf_points(points if args.preset == "grid" else HF_MAIN if args.preset == "gpu" else []),
                          done=json.loads(hf_done.read_text()) if hf_done.exists() else (),
                          save=lambda rows: hf_done.write_text(json.dumps(rows)))
    kernels = (get_attention_fn(), get_cache_update_fn(), get_matmul_fn())
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    itemsize = jnp.dtype(dtype).itemsize
    copy_bw = copy_bandwidth(256 << 20 if args.preset in ("tiny", "cpu") else 2 << 30)
    bw = copy_bw["best"]
    hbm = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 16e9)
    if args.hf_only:
        rows = []
    elif args.preset == "grid":
        rows = grid_rows(args.shapes.split(","), hbm, itemsize, ints(args.contexts), ints(args.batches))
    else:
        rows = preset_rows(args.preset)
    fixed = [r for kv in (KVQUANT_DTYPES if args.preset == "kvquant" else ("",))
             for r in fixed_budget_rows(SHAPES["llama2-7b"], dtype, hbm, args.steps, args.repeats, kernels, kv=kv)] \
        if args.fixed_budget and not args.hf_only else []
    rows += fixed
    if args.mesh:
        rows += [dataclasses.replace(row, mesh=args.mesh) for row in rows if not row.variant]
    if args.ttft_only:
        rows = [row for row in rows if wants_ttft(row)]
    partial = out / "rows.jsonl"  # finished rows; a rerun of the same command skips them
    results = [json.loads(l) for l in partial.read_text().splitlines()] if partial.exists() else []
    params_by_shape = {}

    def params_for(shape):
        if shape not in params_by_shape:
            params_by_shape.clear()
            params_by_shape[shape] = random_params(SHAPES[shape], dtype)
        return params_by_shape[shape]

    def save():  # the finished rows, rewritten whole (atomic)
        tmp = partial.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in results))
        tmp.replace(partial)

    key = lambda row: row.name + f"|{row.shape}|{row.batch}|{row.context}"  # row.name holds the kv dtype
    by_key = {key(_row_of(r)): r for r in results}
    queue = list(rows)
    while queue:  # decode rows first: a prefill that runs out of memory cannot disturb them
        row = queue.pop(0)
        if key(row) not in by_key:
            cfg, params = SHAPES[row.shape], params_for(row.shape)
            try:
                r = {} if args.ttft_only else measure_row(cfg, params, row, args.steps, args.repeats, kernels,
                                                          out / "hlo" if args.hlo else None)
            except Exception as e:  # out of memory at a large batch: record and go on
                r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            if "step_ms" in r:
                need = step_bytes(cfg, params, row, itemsize)
                r.update(bytes_per_step_gb=need / 1e9, roofline_ms=need / bw * 1e3)
                r["roofline_fraction"] = r["roofline_ms"] / r["step_ms"]
            layers = row.variant if row.variant in LAYOUTS else default_layout()
            results.append({**dataclasses.asdict(row), "name": row.name, "layers": layers, **r})
            by_key[key(row)] = results[-1]
            print(json.dumps(results[-1]), flush=True)
            save()
        if row in fixed and "RESOURCE_EXHAUSTED" in by_key[key(row)].get("error", ""):
            smaller = smaller_fixed_budget_row(row)  # its compiled program fit, its run did not (allocator)
            if smaller is not None:
                fixed.append(smaller)
                queue.insert(0, smaller)
    for r in results if args.ttft else []:  # then time to first token, where asked and not yet measured
        row = _row_of(r)
        if "error" in r or "ttft_s" in r or "ttft_error" in r or not wants_ttft(row):
            continue
        for field, kern in ttft_kernels(kernels, args.ttft_blockwise).items():
            try:
                run, run_args = prefill_program(SHAPES[row.shape], params_for(row.shape), row, kern, args.prefill_group)
                if field == "ttft_s":
                    r["prefill_temp_gb"] = run.memory_analysis().temp_size_in_bytes / 1e9  # known even if it cannot run
                    if args.hlo:
                        (out / "hlo").mkdir(parents=True, exist_ok=True)
                        (out / "hlo" / f"prefill_{_file_name(row)}.hlo.txt").write_text(run.as_text())
                r[field] = time_to_first_token(run, run_args)
                del run, run_args
            except Exception as e:  # a prefill that does not fit: the decode row stands
                r[field[:-2] + "_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        fields = ("ttft_s", "ttft_error", "ttft_blockwise_s", "ttft_blockwise_error", "prefill_temp_gb")
        print(json.dumps({"ttft": row.name, "shape": row.shape, "batch": row.batch, "context": row.context,
                          **{k: r[k] for k in fields if k in r}}), flush=True)
        save()
    params_by_shape.clear()
    report = {"device": str(jax.devices()[0]), "copy_bandwidth_tb_s": bw / 1e12,
              "copy_bandwidth_by_method_tb_s": {k: v / 1e12 for k, v in copy_bw.items()}, "default_layout": default_layout(),
              "rows": results, "hf": hf,
              "command": command_line(sys.argv[1:] if argv is None else argv)}
    table = write_report(report, out)
    partial.unlink(missing_ok=True)  # --hf-only saves no rows
    hf_done.unlink(missing_ok=True)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
