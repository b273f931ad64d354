"""Train the ADORE controller on labels from the backbone's full attention.

    adore train-controller --config configs/smollm2.toml [--steps N ...]
    python -m train.controller --config ...

Per batch of token sequences [B, n]:
  labels: the top-K keys of each query row under full attention averaged over
          layers and heads, or of the next `horizon` rows aggregated (labels
          from the future; train.labels), kept as indices [B, n, K];
  loss:   weighted binary cross-entropy over causal pairs ("bce"), or KL from
          the top-K attention row to the softmax of the controller's logits
          ("listwise"); computed in query blocks under remat, so memory stays
          O(B x block x n).
  on-policy (bce, on_policy > 0): the controller's own release schedule for a
          cache of `budget` slots (with `sinks` and `recent` protected) is
          simulated on the batch, and the loss weighs the pairs it meets: each
          step's unprotected candidates once the cache is full, where a
          released token that a later query needs shows as a positive it
          scored too low.
Metrics on the validation book (Northanger Abbey; the test book stays out): recall of the true top-K within the
controller's top-m, precision, AUC; perplexity under the controller's
schedule at m = budget against full attention and StreamingLLM (one parallel
pass each: adore_jax.schedule). orbax CheckpointManager for periodic saves and
exact resume; a jax.sharding Mesh with axes (data, fsdp).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from adore_jax.controller import Controller, feature_layer, model_signature, save_controller
from adore_jax.policies import AdorePolicy, RecencyPolicy
from adore_jax.schedule import schedule_logprobs
from models.cache import KVCache
from models.llama import LlamaConfig, Params, forward
from train.labels import AGGREGATES, topk_labels
from train.config import parse_config as read_config
from train.mesh import fsdp_specs, make_mesh


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a controller training job (a TOML file's keys, each also a --flag)."""

    model: str = ""  # checkpoint dir / .gguf / hub id; "" = the default SmolLM2
    data_dir: str = ""  # packed corpora (train.data); "" = fetched into the cache
    mix: str = ""  # training rows: "" books only, else a train.mix string ("books=0.7,chat=0.15,retrieval=0.15")
    seq_len: int = 1024
    batch_size: int = 8
    steps: int = 1000
    lr: float = 3e-3
    prior_lr: float = 1.0  # learning-rate multiplier of the recency prior (distance-bucket bias and b0)
    warmup: int = 50
    weight_decay: float = 0.01
    clip: float = 1.0
    top_k: int = 64  # K of the labels
    block: int = 256  # query rows per label/loss block
    horizon: int = 1  # labels from the next H queries (1: the current row; at most block + 1)
    label_agg: str = "max"  # how the H rows combine: max | sum
    loss: str = "bce"  # bce | listwise
    pos_weight: float = 8.0  # bce weight of positive pairs
    on_policy: float = 0.0  # weight of the pairs the controller's own schedule meets (0: all causal pairs)
    budget: int = 0  # cache slots m of the schedule (on-policy, perplexity metrics); 0: seq_len // 8
    sinks: int = 0  # protected first positions in the schedule (saved as the policy's default)
    recent: int = 0  # protected recent positions in the schedule (saved as the policy's default)
    feature: str = "embedding"  # embedding | hidden:<layer>
    d_c: int = 64
    num_buckets: int = 16  # distance buckets (log-spaced; the last holds every longer distance)
    eval_every: int = 200
    eval_batches: int = 4
    recall_m: tuple = (64, 128, 256, 512)
    out: str = "runs/controller"  # checkpoints, metrics.jsonl, the final controller
    save_every: int = 100
    keep: int = 3
    log_every: int = 10
    seed: int = 0
    dtype: str = "auto"  # backbone dtype: auto (bf16 on accelerators) | float32 | bfloat16
    data_parallel: int = 0  # mesh axis sizes; 0 = all devices on data
    fsdp: int = 1
    distributed: bool = False  # call jax.distributed.initialize() (multi-host)

    def validate(self) -> "TrainConfig":
        if self.loss not in ("bce", "listwise"):
            raise ValueError(f"loss must be bce or listwise, got {self.loss!r}")
        if self.label_agg not in AGGREGATES:
            raise ValueError(f"label_agg must be one of {AGGREGATES}, got {self.label_agg!r}")
        if not 1 <= self.horizon <= self.block + 1:
            raise ValueError(f"horizon must be in [1, block + 1 = {self.block + 1}], got {self.horizon}")
        if not 0.0 <= self.on_policy <= 1.0 or (self.on_policy and self.loss != "bce"):
            raise ValueError(f"on_policy must be in [0, 1], with loss bce when > 0 (got {self.on_policy}, {self.loss})")
        if not 0 <= self.budget < self.seq_len or self.sinks < 0 or self.recent < 0:
            raise ValueError(f"budget must be in [0, seq_len), sinks and recent >= 0 (got {self.budget}, "
                             f"{self.sinks}, {self.recent})")
        if self.sinks + self.recent >= self.cache_size:
            raise ValueError(f"sinks + recent ({self.sinks + self.recent}) must leave the controller some of the "
                             f"{self.cache_size} slots")
        if not 2 <= self.num_buckets <= 32:
            raise ValueError(f"num_buckets must be in [2, 32], got {self.num_buckets}")
        if not (self.feature == "embedding" or self.feature.startswith("hidden:")):
            raise ValueError(f"feature must be embedding or hidden:<layer>, got {self.feature!r}")
        if self.seq_len % self.block:
            raise ValueError(f"seq_len ({self.seq_len}) must be a multiple of block ({self.block})")
        if self.steps < 1 or self.batch_size < 1 or self.top_k < 1:
            raise ValueError("steps, batch_size and top_k must be >= 1")
        if self.prior_lr <= 0:
            raise ValueError(f"prior_lr must be > 0, got {self.prior_lr}")
        return self

    @property
    def cache_size(self) -> int:
        """m of the schedule: budget, or 1/8 of the sequence."""
        return self.budget or self.seq_len // 8


# ---------------------------------------------------------------- features and labels


def features(params: Params, cfg: LlamaConfig, tokens: jax.Array, feature: str) -> jax.Array:
    """Controller inputs [B, n, E]: token embeddings, or the RMS-normalized
    residual stream entering layer l ("hidden:l")."""
    if feature == "embedding":
        return jnp.take(params.embed, tokens, axis=0)
    layer = int(feature.split(":")[1])
    E = cfg.hidden_size
    sub = Params(
        embed=params.embed,
        layers=jax.tree_util.tree_map(lambda x: x[:layer], params.layers),
        final_norm=jnp.ones((E,), params.embed.dtype),
        lm_head=jnp.eye(E, dtype=params.embed.dtype),
    )
    sub_cfg = dataclasses.replace(cfg, num_layers=layer, tie_word_embeddings=False)
    B, n = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n))
    empty = KVCache.empty(layer, B, 0, cfg.num_kv_heads, cfg.head_dim, params.embed.dtype)
    return forward(sub, sub_cfg, tokens, pos, empty)[0]


def _dense(idx: jax.Array, w: jax.Array, n: int):
    """Scatter [B, T, K] indices/weights into dense [B, T, n] (labels bool, weights)."""
    B, T, K = idx.shape
    b = jnp.arange(B)[:, None, None]
    t = jnp.arange(T)[None, :, None]
    lab = jnp.zeros((B, T, n), bool).at[b, t, idx].set(w > 0)
    wt = jnp.zeros((B, T, n), jnp.float32).at[b, t, idx].add(w)
    return lab, wt


# ---------------------------------------------------------------- loss and metrics


def _block_logits(ctrl: Controller, q, k, start, block):
    B, n, _ = k.shape
    rows = start + jnp.arange(block, dtype=jnp.int32)
    qb = jax.lax.dynamic_slice_in_dim(q, start, block, axis=1)
    kpos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n))
    logits = ctrl.logits(qb, jnp.broadcast_to(rows, (B, block)), k, kpos)
    causal = jnp.arange(n)[None, :] <= rows[:, None]
    return logits, causal


def schedule_policy(gd, tc: TrainConfig, layer: Optional[int] = None) -> AdorePolicy:
    """The ADORE policy (no rebuild) whose release schedule on-policy training follows."""
    return AdorePolicy(tc.cache_size, tc.sinks, tc.recent, graphdef=gd, feature_layer=layer)


def pair_weights(rows: jax.Array, n: int, leave: Optional[jax.Array], tc: TrainConfig) -> jax.Array:
    """Loss weight [B or 1, T, n] of the pairs (query rows [T], key j): causal pairs
    (1 - on_policy), plus on_policy where the schedule `leave` [B, n] makes j a candidate
    for release at that row (held, unprotected, the cache full)."""
    j = jnp.arange(n)[None, :]
    causal = (j <= rows[:, None])[None].astype(jnp.float32)
    if leave is None or not tc.on_policy:
        return causal
    t = rows[None, :, None]
    protected = (j < tc.sinks) | (j > rows[:, None] - tc.recent)
    cand = (causal > 0) & (t <= leave[:, None, :]) & ~protected[None] & (t >= tc.cache_size)
    return (1.0 - tc.on_policy) * causal + tc.on_policy * cand


def loss_fn(ctrl: Controller, x, idx, w, tc: TrainConfig, leave: Optional[jax.Array] = None):
    """Mean loss over weighted pairs (bce; pair_weights) or rows (listwise).
    x [B, n, E]; idx, w [B, n, K]; leave [B, n]: the schedule of on-policy training."""
    B, n, _ = x.shape
    _, q, k = ctrl.scan(ctrl.init_state(B), jax.lax.stop_gradient(x), jnp.ones((B, n), bool))

    @jax.checkpoint
    def block_loss(q, k, start):
        logits, _ = _block_logits(ctrl, q, k, start, tc.block)
        bi = jax.lax.dynamic_slice_in_dim(idx, start, tc.block, axis=1)
        bw = jax.lax.dynamic_slice_in_dim(w, start, tc.block, axis=1)
        lab, wt = _dense(bi, bw, n)
        if tc.loss == "bce":
            per = optax.sigmoid_binary_cross_entropy(logits, lab.astype(jnp.float32))
            pw = jnp.broadcast_to(pair_weights(start + jnp.arange(tc.block), n, leave, tc), per.shape)
            return jnp.sum(pw * jnp.where(lab, tc.pos_weight, 1.0) * per), jnp.sum(pw)
        causal = jnp.arange(n)[None, :] <= (start + jnp.arange(tc.block))[:, None]
        target = wt / jnp.maximum(jnp.sum(wt, -1, keepdims=True), 1e-9)
        logp = jax.nn.log_softmax(jnp.where(causal[None], logits, -1e9), axis=-1)
        kl = jnp.sum(jnp.where(target > 0, target * (jnp.log(jnp.maximum(target, 1e-9)) - logp), 0.0), -1)
        return jnp.sum(kl), jnp.float32(B * tc.block)

    def body(acc, start):
        s, c = block_loss(q, k, start)
        return (acc[0] + s, acc[1] + c), None

    (total, count), _ = jax.lax.scan(body, (0.0, jnp.float32(0)), jnp.arange(0, n, tc.block))
    return total / jnp.maximum(count, 1.0)


def metrics_fn(ctrl: Controller, x, idx, w, tc: TrainConfig):
    """Held-out metrics: recall@m, precision@m (rows t >= m) and row AUC, averaged."""
    B, n, _ = x.shape
    _, q, k = ctrl.scan(ctrl.init_state(B), x, jnp.ones((B, n), bool))
    ms = [m for m in tc.recall_m if m < n]
    big = max(ms) if ms else 1

    def body(acc, start):
        logits, causal = _block_logits(ctrl, q, k, start, tc.block)
        bi = jax.lax.dynamic_slice_in_dim(idx, start, tc.block, axis=1)
        bw = jax.lax.dynamic_slice_in_dim(w, start, tc.block, axis=1)
        lab, _ = _dense(bi, bw, n)
        masked = jnp.where(causal[None], logits, -jnp.inf)
        _, top = jax.lax.top_k(masked, big)
        hit = jnp.take_along_axis(lab, top, axis=-1)  # [B, block, big]
        rows = start + jnp.arange(tc.block)
        npos = jnp.sum(lab, -1)
        out = {}
        for m in ms:
            valid = (rows >= m)[None, :] & (npos > 0)
            h = jnp.sum(hit[..., :m], -1)
            out[f"recall@{m}"] = (jnp.sum(jnp.where(valid, h / jnp.maximum(npos, 1), 0.0)), jnp.sum(valid))
            out[f"precision@{m}"] = (jnp.sum(jnp.where(valid, h / m, 0.0)), jnp.sum(valid))
        rank = jnp.argsort(jnp.argsort(masked, axis=-1), axis=-1).astype(jnp.float32)  # 0 = lowest
        ncaus = jnp.sum(causal, -1)[None]
        rank = rank - (n - ncaus)[..., None]  # masked keys sort first: causal ranks start at 0
        nneg = ncaus - npos
        auc = (jnp.sum(jnp.where(lab, rank, 0.0), -1) - npos * (npos - 1) / 2) / jnp.maximum(npos * nneg, 1)
        ok = (npos > 0) & (nneg > 0)
        out["auc"] = (jnp.sum(jnp.where(ok, auc, 0.0)), jnp.sum(ok))
        acc = {kk: (acc[kk][0] + v[0], acc[kk][1] + v[1]) for kk, v in out.items()}
        return acc, None

    keys = [f"recall@{m}" for m in ms] + [f"precision@{m}" for m in ms] + ["auc"]
    init = {kk: (jnp.float32(0), jnp.int32(0)) for kk in keys}
    acc, _ = jax.lax.scan(body, init, jnp.arange(0, n, tc.block))
    return acc


# ---------------------------------------------------------------- the job


@dataclasses.dataclass
class Job:
    """A loaded training job: config, backbone, token rows [N, n] of training and validation, mesh."""

    tc: TrainConfig
    cfg: LlamaConfig
    params: Params
    train: np.ndarray  # [N, n] int32 (memory-mapped)
    valid: np.ndarray  # [M, n] int32: the validation book (never trained on; the test book stays out)
    mesh: jax.sharding.Mesh
    source: str = ""


def _schedule(tc: TrainConfig):
    return optax.warmup_cosine_decay_schedule(0.0, tc.lr, min(tc.warmup, tc.steps), max(tc.steps, tc.warmup + 1), tc.lr * 0.05)


PRIOR = ("bucket_bias", "b0")  # the controller's recency prior: its learning rate is lr * prior_lr


def make_optimizer(tc: TrainConfig):
    """AdamW with global-norm clipping and warmup + cosine decay of the learning rate;
    the recency prior (PRIOR) at prior_lr times the rate."""
    sched = _schedule(tc)
    prior = lambda tree: jax.tree_util.tree_map_with_path(
        lambda path, _: "prior" if any(getattr(k, "key", None) in PRIOR for k in path) else "rest", tree)
    return optax.chain(optax.clip_by_global_norm(tc.clip), optax.multi_transform(
        {"rest": optax.adamw(sched, weight_decay=tc.weight_decay),
         "prior": optax.adamw(lambda step: sched(step) * tc.prior_lr, weight_decay=tc.weight_decay)}, prior))


def batch_indices(tc: TrainConfig, n_rows: int, step: int) -> np.ndarray:
    """Rows of the training set for a step: a seeded permutation per epoch (so resume is exact)."""
    per_epoch = max(n_rows // tc.batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([tc.seed, epoch]).permutation(n_rows)
    return perm[i * tc.batch_size:(i + 1) * tc.batch_size]


def _global_batch(job: Job, rows: np.ndarray) -> jax.Array:
    """Place a [B, n] batch sharded over the data axis (each process its slice)."""
    sharding = NamedSharding(job.mesh, P("data"))
    local = np.asarray(rows, np.int32)
    if jax.process_count() > 1:
        per = local.shape[0] // jax.process_count()
        local = local[jax.process_index() * per:(jax.process_index() + 1) * per]
    return jax.make_array_from_process_local_data(sharding, local)


def _labels(tc: TrainConfig, cfg, params, tokens):
    return topk_labels(params, cfg, tokens, tc.top_k, tc.block, tc.horizon, tc.label_agg)


def _train_step(gd, tc, cfg, opt, params, state, opt_state, tokens):
    idx, w = _labels(tc, cfg, params, tokens)
    x = features(params, cfg, tokens, tc.feature)
    leave = None
    if tc.on_policy:  # the schedule the controller makes today, without gradient
        leave = schedule_policy(gd, tc, feature_layer(tc.feature)).release_schedule(state, jax.lax.stop_gradient(x))

    def f(state):
        return loss_fn(nnx.merge(gd, state), x, idx, w, tc, leave)

    loss, grads = jax.value_and_grad(f)(state)
    updates, opt_state = opt.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, loss


def schedule_nll(gd, tc: TrainConfig, cfg, params, state, tokens, x) -> dict:
    """NLL sums and token counts {name: (sum, count)} of tokens [B, n] under full
    attention, StreamingLLM (4 sinks) and the controller's own schedule, all at
    m = tc.cache_size (adore_jax.schedule: one pass each). x: the controller's inputs."""
    B, n = tokens.shape
    m = tc.cache_size
    leaves = {
        "full": jnp.full((B, n), n, jnp.int32),
        "streaming": RecencyPolicy(m, 4, m - 4).release_schedule(None, x),
        "adore": schedule_policy(gd, tc, feature_layer(tc.feature)).release_schedule(state, x),
    }
    out = {}
    for name, leave in leaves.items():
        lp = schedule_logprobs(params, cfg, tokens, leave)
        out[f"nll_{name}@{m}"] = (-jnp.sum(lp), jnp.int32(lp.size))
    return out


def eval_step(gd, tc, cfg, params, state, tokens):
    """Held-out metric sums (metrics_fn, schedule_nll) for one batch of tokens [B, n]."""
    idx, w = _labels(tc, cfg, params, tokens)
    x = features(params, cfg, tokens, tc.feature)
    return {**metrics_fn(nnx.merge(gd, state), x, idx, w, tc), **schedule_nll(gd, tc, cfg, params, state, tokens, x)}


def evaluate(job: Job, gd, state, eval_fn) -> dict:
    """Held-out metrics averaged over tc.eval_batches batches; each mean NLL `nll_X`
    also gives its perplexity `ppl_X`."""
    tc = job.tc
    acc = None
    B = tc.batch_size
    for i in range(min(tc.eval_batches, max(len(job.valid) // B, 1))):
        rows = job.valid[i * B:(i + 1) * B]
        if len(rows) < B:
            break
        out = jax.device_get(eval_fn(job.params, state, _global_batch(job, rows)))
        acc = out if acc is None else {k: (acc[k][0] + v[0], acc[k][1] + v[1]) for k, v in out.items()}
    metrics = {k: float(s) / max(int(c), 1) for k, (s, c) in (acc or {}).items()}
    metrics.update({"ppl" + k[3:]: math.exp(v) for k, v in list(metrics.items()) if k.startswith("nll")})
    return metrics


def train(job: Job, stop_after: Optional[int] = None, progress: bool = True,
          stop_at: Optional[float] = None) -> tuple[Controller, dict]:
    """Train (resuming from the latest checkpoint in tc.out); returns (controller, last metrics).

    stop_after: return after this many steps of this call (to test resume).
    stop_at: a time.time() after which the step in progress is the last (evaluated and saved)."""
    tc = job.tc
    out = Path(tc.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    d_in = job.cfg.hidden_size
    ctrl = Controller(d_in, tc.d_c, tc.num_buckets, feature_layer(tc.feature), rngs=nnx.Rngs(tc.seed))
    gd, state = nnx.split(ctrl)
    opt = make_optimizer(tc)
    opt_state = opt.init(state)
    replicated = NamedSharding(job.mesh, P())
    state, opt_state = jax.device_put((state, opt_state), replicated)
    step_fn = jax.jit(functools.partial(_train_step, gd, tc, job.cfg, opt), donate_argnums=(1, 2))
    eval_fn = jax.jit(functools.partial(eval_step, gd, tc, job.cfg))
    options = ocp.CheckpointManagerOptions(save_interval_steps=tc.save_every, max_to_keep=tc.keep)
    log = open(out / "metrics.jsonl", "a")
    last_metrics: dict = {}
    with ocp.CheckpointManager(out / "checkpoints", options=options) as mngr:
        start = mngr.latest_step() or 0
        if start:
            target = {"state": state, "opt": opt_state}
            restored = mngr.restore(start, args=ocp.args.StandardRestore(target))
            state, opt_state = restored["state"], restored["opt"]
        end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
        bar = tqdm(range(start, end), initial=start, total=tc.steps, desc="controller", disable=not progress)
        t0 = time.perf_counter()
        for step in bar:
            tokens = _global_batch(job, job.train[np.sort(batch_indices(tc, len(job.train), step))])
            state, opt_state, loss = step_fn(job.params, state, opt_state, tokens)
            done = step + 1
            late = stop_at is not None and time.time() >= stop_at
            if done % tc.log_every == 0 or done == end or late:
                rec = {"step": done, "loss": float(loss), "lr": float(_schedule(tc)(done)), "time_s": time.perf_counter() - t0}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{rec['loss']:.4f}", **{k: f"{v:.3f}" for k, v in last_metrics.items() if k.startswith("recall@")})
            if done % tc.eval_every == 0 or done == tc.steps or late:
                last_metrics = evaluate(job, gd, state, eval_fn)
                log.write(json.dumps({"step": done, "eval": last_metrics}) + "\n")
                log.flush()
            mngr.save(done, args=ocp.args.StandardSave({"state": state, "opt": opt_state}), force=done == end or late)
            if late:
                break
        mngr.wait_until_finished()
    log.close()
    return nnx.merge(gd, state), last_metrics


# ---------------------------------------------------------------- entry points


def load_job(tc: TrainConfig) -> Job:
    """Load the backbone, the packed corpora (fetching them if needed) and build the mesh."""
    from adore_jax.hub import resolve_model
    from models.loading import load_model, resolve_dtype
    from train.data import load_or_build_packed

    if tc.distributed:
        jax.distributed.initialize()
    model = load_model(resolve_model(tc.model or None), dtype=resolve_dtype(tc.dtype), layers="stacked")
    mesh = make_mesh(tc.data_parallel, tc.fsdp)
    params = jax.device_put(model.params, fsdp_specs(model.params, mesh))
    data_dir = load_or_build_packed(tc.data_dir or None, model.tokenizer, tc.seq_len, tc.mix or None)
    train_rows, valid_rows = (np.load(Path(data_dir) / f"{s}.npy", mmap_mode="r") for s in ("train", "valid"))
    if len(train_rows) < tc.batch_size:
        raise ValueError(f"only {len(train_rows)} training sequences of {tc.seq_len} tokens; lower batch_size")
    if tc.batch_size % mesh.shape["data"]:
        raise ValueError(f"batch_size {tc.batch_size} must be a multiple of the data axis ({mesh.shape['data']})")
    return Job(tc, model.cfg, params, train_rows, valid_rows, mesh, model.source)


def write_model_card(path: Path, tc: TrainConfig, job: Job, metrics: dict, command: str) -> None:
    """MODEL_CARD.md in path: data, labels, loss, schedule and the validation metrics."""
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()))
    labels = "the current query row" if tc.horizon == 1 else f"the {tc.label_agg} over the next {tc.horizon} query rows"
    text = f"""# ADORE controller for {Path(job.source).name}

- Backbone shape: {model_signature(job.cfg)}
- Data: {tc.mix or "books only"} (train split of `adore data fetch`: Austen and Shakespeare, chat and retrieval rows
  made from them); Northanger Abbey validates, Persuasion (test) and the out-of-domain text are never seen
- Sequences: {tc.seq_len} tokens, batch {tc.batch_size}, {tc.steps} steps
- Labels: top-{tc.top_k} keys of {labels}, attention averaged over layers and heads
- Loss: {tc.loss} (positive weight {tc.pos_weight}), on-policy weight {tc.on_policy} on the schedule of m = {tc.cache_size}
  slots with {tc.sinks} sinks and {tc.recent} recent positions protected
- Controller: feature {tc.feature}; d_c = {tc.d_c}; {tc.num_buckets} distance buckets; lr {tc.lr} (AdamW, warmup
  {tc.warmup}, cosine)
- Command: `{command}`

Validation metrics (Northanger Abbey, {tc.eval_batches} batches of {tc.batch_size} x {tc.seq_len} tokens; `ppl_*@m`:
perplexity under each schedule at m slots, one parallel pass):

| metric | value |
|---|---|
{rows}
"""
    (path / "MODEL_CARD.md").write_text(text)


def parse_config(argv) -> TrainConfig:
    """TrainConfig from --config FILE.toml plus --field value overrides."""
    return read_config(TrainConfig, argv, "adore train-controller", "train the ADORE controller")


def main(argv=None) -> int:
    """`adore train-controller`: train, then write OUT/controller with its model card."""
    tc = parse_config(sys.argv[1:] if argv is None else argv)
    job = load_job(tc)
    ctrl, metrics = train(job)
    final = Path(tc.out).absolute() / "controller"
    save_controller(final, ctrl, {"backbone": model_signature(job.cfg), "feature": tc.feature, "metrics": metrics})
    write_model_card(final, tc, job, metrics, "adore train-controller " + " ".join(sys.argv[1:] if argv is None else argv))
    print(json.dumps({"controller": str(final), **metrics}, indent=2))
    return 0


if __name__ == "__main__":
    from adore_jax.cli import run_main

    sys.exit(run_main(main))
