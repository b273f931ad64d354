"""Sharded generate against one device, run by tests/test_sharding.py in a process
with 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8).

    python tests/sharded_runs.py CHECKPOINT_DIR   # prints one JSON object

For each case (model, policy, mesh): greedy float32 tokens of 8 prompts under
shard_map, against the same prompts on one device (XLA's reference kernels).
Where the model axis splits heads, the steps run the Pallas GPU kernels in
interpret mode (attention and cache update); on the data-only mesh, whose
shards hold every head as one device does, XLA's reference (a compile is most of
this check's time).
The models: a tiny GQA model (16 query, 8 KV heads; every policy on the (2, 4) mesh,
which splits both sequences and heads, and on the meshes that split one of them the
policies whose sharded step differs there: GQA_POLICIES), a tiny MQA one (8 query heads,
one KV head; full and adore on 8 model shards), and a random
Qwen2-style checkpoint of another shape (head dim 32, biases, an MLP and a vocab
that do not split over 4, so stay whole), written to CHECKPOINT_DIR, loaded with
load_model(mesh=) in unstacked layers (with a controller reading the hidden
state, the few-row matmul kernel too).
Also: the compiled HLO of one decode step on a sharded cache, and the errors of
meshes that do not fit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))

from adore_jax import engine  # noqa: E402
from adore_jax.controller import new_controller  # noqa: E402
from adore_jax.kernels import get_attention_fn, get_cache_update_fn, get_matmul_fn  # noqa: E402
from adore_jax.policies import POLICIES, make_policy  # noqa: E402
from adore_jax.sampling import SamplingParams  # noqa: E402
from adore_jax.sharding import make_mesh  # noqa: E402
from eval.hlo_copies import copies  # noqa: E402
from models.llama import LlamaConfig, init_params  # noqa: E402
from models.loading import HF_NAMES, load_model, place_params  # noqa: E402
from tiny_model import prompts  # noqa: E402

GQA = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=16, num_kv_heads=8,
                  head_dim=16, max_position_embeddings=256, eos_token_ids=(127,))
MQA = dataclasses.replace(GQA, num_heads=8, num_kv_heads=1)
HF_CONFIG = dict(model_type="qwen2", vocab_size=102, hidden_size=48, intermediate_size=84, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=256,
                 tie_word_embeddings=False, eos_token_id=101)
MESHES = ((8, 1), (2, 4), (1, 8))
# (data, model) -> the GQA model's policies on that mesh (each compiled policy adds seconds). Full
# attention (the plain step) on each; on data shards only, the policies with per-sequence state
# (h2o's accumulated attention; adore's history, and its step count kept whole); on model shards
# only, those reading the attention mass summed over the model axis (tova; oracle in two passes)
# and adore (its controller run on every shard must release the same slots).
GQA_POLICIES = {(8, 1): ("full", "h2o", "adore"), (2, 4): POLICIES, (1, 8): ("full", "tova", "oracle", "adore")}
PROMPTS = prompts(3, [5, 11, 7, 9, 3, 12, 6, 8], vocab=96)
NEW = 4
KERNELS = dict(attn_fn=get_attention_fn("pallas_gpu", interpret=True),
               cache_update=get_cache_update_fn("pallas_gpu", interpret=True))
WITH_MATMUL = dict(KERNELS, matmul_fn=get_matmul_fn("pallas_gpu", interpret=True))


def write_checkpoint(path: Path) -> None:
    """A random HF checkpoint (config.json + model.safetensors) of HF_CONFIG."""
    from safetensors.numpy import save_file

    from models.llama import config_from_hf

    cfg = config_from_hf(HF_CONFIG)
    p = jax.device_get(init_params(cfg, jax.random.key(7), scale=0.3))
    t = {HF_NAMES["embed"]: p.embed, HF_NAMES["final_norm"]: p.final_norm, HF_NAMES["lm_head"]: p.lm_head.T}
    lp = p.layers
    for i in range(cfg.num_layers):
        name = lambda key: HF_NAMES[key].format(i=i)
        t[name("attn_norm")], t[name("mlp_norm")] = lp.attn_norm[i], lp.mlp_norm[i]
        for key in ("wq", "wk", "wv", "wo"):
            t[name(key)] = lp.__dict__[key][i].T
        for key in ("bq", "bk", "bv"):
            t[name(key)] = lp.__dict__[key][i]
        t[name("w_gate")], t[name("w_up")] = lp.w_gate_up[i, :, 0].T, lp.w_gate_up[i, :, 1].T
        t[name("w_down")] = lp.w_down[i].T
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in t.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(HF_CONFIG))


def policy(name: str, cfg: LlamaConfig, feature_layer=None):
    """(policy, params) with a budget of 8 slots; adore rebuilds 2 rows with a random controller."""
    if name != "adore":
        return make_policy(name, None if name == "full" else 8), None
    gd, state = nnx.split(new_controller(cfg.hidden_size, 16, seed=1, feature_layer=feature_layer))
    return make_policy("adore", 8, rebuild=2, controller_graphdef=gd, feature_layer=feature_layer), state


@functools.partial(jax.jit, static_argnums=(0, 1))
def generate_all(cfg, ecs, params, pps, tokens, lens):
    """Greedy tokens [B, NEW] for each engine config, in one program (a compile is
    most of this check's time, and one program for every policy compiles faster)."""
    key, sp = jax.random.key(0), SamplingParams().validate()
    return [engine._generate_jit(params, pp, cfg, ec, tokens, lens, key, sp).out for ec, pp in zip(ecs, pps)]


def run(cfg, params, runs, mesh=None) -> list:
    """Tokens of each (policy, policy params, kernels) in `runs` on `mesh` (None: one
    device, XLA's reference kernels; a data-only mesh: the reference kernels too)."""
    ecs = []
    for pol, _, kernels in runs:
        split = mesh is not None and mesh.shape["model"] > 1
        ec, tokens, lens = engine._prepare(cfg, PROMPTS, NEW, dict(policy=pol, mesh=mesh, **(kernels if split else {})))
        ecs.append(ec)
    outs = generate_all(cfg, tuple(ecs), params, [pp for _, pp, _ in runs], tokens, lens)
    return [np.asarray(o).tolist() for o in outs]


def jobs(ckpt: Path) -> list:
    """(model, cfg, policy names, [(mesh shape or None, params, policy names there)], runs by
    policy name): one program per mesh; one device runs every policy of the model."""
    out = []
    for mname, cfg, on_mesh in (("gqa", GQA, GQA_POLICIES), ("mqa", MQA, {MESHES[2]: ("full", "adore")})):
        host = jax.device_get(init_params(cfg, jax.random.key(0), scale=0.3))
        names = [n for n in POLICIES if any(n in ns for ns in on_mesh.values())]
        placed = [(None, place_params(cfg, host), names)]
        placed += [(m, place_params(cfg, host, make_mesh({"data": m[0], "model": m[1]}), "stacked"), list(ns))
                   for m, ns in on_mesh.items()]
        out.append((mname, cfg, names, placed, {n: (*policy(n, cfg), KERNELS) for n in names}))
    one = load_model(ckpt)
    split = load_model(ckpt, mesh=make_mesh({"data": 2, "model": 4}), layers="unstacked")
    names = ["full", "adore hidden:1"]
    out.append(("checkpoint", one.cfg, names, [(None, one.params, names), ((2, 4), split.params, names)],
                {"full": (*policy("full", one.cfg), KERNELS), "adore hidden:1": (*policy("adore", one.cfg, 1), WITH_MATMUL)}))
    return out


def compare(job_list) -> list:
    """{model, policy, equal: {mesh: tokens equal one device's}} per model and policy."""
    tasks = [(j, m, p, names) for j in job_list for m, p, names in j[3]]

    def one(task):
        (_, cfg, _, _, runs), m, params, names = task
        outs = run(cfg, params, [runs[n] for n in names], None if m is None else make_mesh({"data": m[0], "model": m[1]}))
        return dict(zip(names, outs))

    with ThreadPoolExecutor(2) as pool:  # compiles overlap
        outs = list(pool.map(one, tasks))
    results = []
    for j in job_list:
        got = {m: o for (jj, m, _, _), o in zip(tasks, outs) if jj is j}  # mesh shape (None: one device) -> {policy: tokens}
        for name in j[2]:
            equal = {f"{m[0]}x{m[1]}": o[name] == got[None][name] for m, o in got.items() if m is not None and name in o}
            results.append({"model": j[0], "policy": name, "equal": equal})
    return results


def decode_step_hlo(mesh):
    """Optimized HLO of one decode step (engine's decode chunk, n = 1; XLA's reference
    kernels, the CPU's default) and the cache's local shape."""
    pol = make_policy("streaming", 8)
    host = jax.device_get(init_params(GQA, jax.random.key(0), scale=0.3))
    params = place_params(GQA, host, mesh, "stacked") if mesh else place_params(GQA, host)
    ec, toks, lens = engine._prepare(GQA, PROMPTS, NEW, dict(policy=pol, mesh=mesh))
    sp = SamplingParams().validate()
    s = engine._prefill_jit(params, None, GQA, ec, toks, lens, jax.random.key(0), sp)
    local = s.cache.k.addressable_shards[0].data.shape
    return engine._decode_chunk_jit.lower(params, None, GQA, ec, s, sp, 1).compile().as_text(), local


def hlo_check() -> dict:
    """Collectives of a cache-sized buffer in the sharded step (none expected), and
    the copies of the cache (its local shape) in the sharded step against those of
    the one-device step (XLA:CPU copies a loop-carried buffer; sharding must add none)."""
    sharded, local = decode_step_hlo(make_mesh({"data": 2, "model": 4}))
    one, whole = decode_step_hlo(None)
    cache_size = int(np.prod(local))
    dims = lambda shape: "[" + ",".join(map(str, shape)) + "]"
    collectives = [l.strip()[:160] for l in sharded.splitlines()
                   if re.search(r"= \w+\[([\d,]*)\]\S* (all-gather|all-to-all|collective-permute|all-reduce)\(", l)
                   and int(np.prod([int(x) for x in re.search(r"\[([\d,]*)\]", l).group(1).split(",") if x] or [1]))
                   >= cache_size]
    count = lambda text, shape: sum(dims(shape) in c.shape for c in copies(text))
    return {"cache_collectives": collectives, "cache_copies_sharded": count(sharded, local),
            "cache_copies_one_device": count(one, whole)}


def errors() -> dict:
    """The messages of meshes that do not fit (batch, KV heads)."""
    out = {}
    for key, cfg, shape, n in (("batch", GQA, (8, 1), 6), ("kv_heads", dataclasses.replace(GQA, num_kv_heads=2), (1, 8), 8)):
        try:
            engine.generate(None, cfg, PROMPTS[:n], NEW, mesh=make_mesh({"data": shape[0], "model": shape[1]}))
            out[key] = ""
        except ValueError as e:
            out[key] = str(e)
    return out


def main(ckpt: Path) -> None:
    write_checkpoint(ckpt)
    print(json.dumps({"cases": compare(jobs(ckpt)), "hlo": hlo_check(), "errors": errors()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
