"""Stage 1 of ADORE: fine-tune the backbone to top-K sparse attention with LoRA; the result is an adapter.

    adore finetune-sparse --config FILE.toml [--steps N --top-k K --rank r ...]
    python -m train.finetune ...

* `topk_attention(K)`: each query row attends only to its K keys of highest
  attention weight. The set is chosen per layer from the head-averaged
  probability of the row (one set for all heads: the shared decision) and the
  softmax is renormalized over the kept keys.
* LoRA on wq, wk, wv, wo (models/lora.py): W' = W + A @ B * (alpha / r) with A
  [L, in, r] (normal / sqrt(in)) and B [L, r, out] (zeros). `apply_lora` is both
  the training-time parameterization and the merge at load time.
* The optimizer sees {"base": Params, "lora": LoraParams}; optax.multi_transform
  gives the LoRA leaves AdamW and the base optax.set_to_zero(), so the base is
  frozen by construction.
* Reports held-out (Persuasion) perplexity under top-K and full attention
  before and after; saves the adapter folder OUT/adapter (models/lora.py), which
  `load_model(..., adapter=)` and `--adapter DIR` on generate and eval merge.
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
from tqdm import tqdm

from models.attention import NEG_INF, AttentionFn, AttentionOut, layer_cache, reference_attention
from models.cache import KVCache
from models.llama import LlamaConfig, Params, forward
from models.lora import LoraParams, apply_lora, init_lora, save_adapter
from train.config import parse_config as read_config
from train.controller import batch_indices


# ---------------------------------------------------------------- top-K attention


def _masked_softmax(s: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax of scores s [B, Hkv, G, T, N] over keys where mask [B, T, N] holds (rows with none: 0)."""
    s = jnp.where(mask[:, None, None], s, NEG_INF)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(mask[:, None, None], p, 0.0)
    return p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)


def _topk_scores(q, keys, key_pos, q_pos, k: int):
    """(scores s [B, Hkv, G, T, N] fp32, keep [B, T, N] bool) of top-k attention."""
    B, T, Hq, D = q.shape
    Hkv = keys.shape[2]
    qg = q.reshape(B, T, Hkv, Hq // Hkv, D)
    s = jnp.einsum("bthgd,bshd->bhgts", qg, keys, preferred_element_type=jnp.float32) * D**-0.5
    allowed = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= q_pos[:, :, None])  # [B, T, N]
    avg = jax.lax.stop_gradient(_masked_softmax(s, allowed).mean(axis=(1, 2)))  # [B, T, N]
    _, idx = jax.lax.top_k(jnp.where(allowed, avg, -1.0), k)  # [B, T, k]
    b, t = jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None]
    keep = jnp.zeros(allowed.shape, bool).at[b, t, idx].set(True) & allowed
    return s, keep


def _topk_out(q, keys, vals, key_pos, q_pos, k: int) -> jax.Array:
    """Top-k attention output [B, T, Hq, D] (q's dtype)."""
    B, T, Hq, D = q.shape
    s, keep = _topk_scores(q, keys, key_pos, q_pos, k)
    p = _masked_softmax(s, keep)  # [B, Hkv, G, T, N]
    out = jnp.einsum("bhgts,bshd->bthgd", p.astype(vals.dtype), vals, preferred_element_type=jnp.float32)
    return out.reshape(B, T, Hq, D).astype(q.dtype)


@functools.cache
def topk_attention(k: int) -> AttentionFn:
    """An attention function (reference_attention's signature) where each query
    row attends only to its k keys of highest head-averaged probability over
    cache + new keys (one set for all heads), softmax renormalized over them.

    Equals reference_attention when k >= S + T (and, up to rounding, whenever
    k >= the number of valid keys of every row). The key choice carries no
    gradient. The output is rematerialized in the backward pass (jax.checkpoint):
    a training step keeps q, k and v of each layer, not its [B, H, T, N] scores.
    Cached: one function object per k (so jit caches hit).
    """
    out_fn = jax.checkpoint(functools.partial(_topk_out, k=k))

    def attn(q, new_k, new_v, cache_k, cache_v, cache_pos, q_pos, *, layer=None, with_stats=False) -> AttentionOut:
        cache_k, cache_v = layer_cache(cache_k, cache_v, layer)
        B, T, Hq, D = q.shape
        if k >= cache_k.shape[1] + T:
            return reference_attention(q, new_k, new_v, cache_k, cache_v, cache_pos, q_pos, with_stats=with_stats)
        keys = jnp.concatenate([cache_k, new_k], axis=1)  # [B, N, Hkv, D]
        vals = jnp.concatenate([cache_v, new_v], axis=1)
        key_pos = jnp.concatenate([cache_pos, q_pos], axis=1)  # [B, N]
        out = out_fn(q, keys, vals, key_pos, q_pos)
        if not with_stats:
            return AttentionOut(out)
        s, keep = _topk_scores(q, keys, key_pos, q_pos, k)
        p = _masked_softmax(s, keep)
        sk = jnp.where(keep[:, None, None], s, NEG_INF)
        lse = jax.nn.logsumexp(sk, axis=-1).transpose(0, 3, 1, 2).reshape(B, T, Hq)
        return AttentionOut(out, jnp.sum(p, axis=(1, 2)), lse)

    return attn


# ---------------------------------------------------------------- LoRA


# ---------------------------------------------------------------- loss


def nll_sum(params: Params, cfg: LlamaConfig, tokens: jax.Array, attn_fn: AttentionFn = reference_attention):
    """(summed next-token negative log-likelihood, number of predicted tokens) for tokens [B, n]."""
    B, n = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n))
    empty = KVCache.empty(cfg.num_layers, B, 0, cfg.num_kv_heads, cfg.head_dim, params.embed.dtype)
    logits = forward(params, cfg, tokens, pos, empty, attn_fn)[0]  # [B, n, V] fp32
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    return jnp.sum(nll), B * (n - 1)


# ---------------------------------------------------------------- the job


@dataclasses.dataclass
class FinetuneConfig:
    """Settings of the Stage-1 sparse fine-tuning job (TOML keys and command-line flags)."""
    model: str = ""  # checkpoint dir / .gguf / hub id; "" = the default SmolLM2
    data_dir: str = ""  # packed corpora (train.data); "" = fetched into the cache
    mix: str = ""  # training rows: "" books only, else a train.mix string ("books=0.7,chat=0.15,retrieval=0.15")
    seq_len: int = 256
    batch_size: int = 4
    steps: int = 100
    top_k: int = 32  # K of the sparse attention
    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # LoRA scale alpha (delta = A @ B * alpha / r)
    lr: float = 1e-3
    warmup: int = 10
    weight_decay: float = 0.0
    clip: float = 1.0
    eval_seqs: int = 8  # held-out sequences for the perplexities
    out: str = "runs/finetune"  # checkpoints, metrics.jsonl, report.json, adapter/
    save_every: int = 50
    keep: int = 2
    log_every: int = 5
    seed: int = 0
    dtype: str = "auto"  # backbone dtype: auto (bf16 on accelerators) | float32 | bfloat16

    def validate(self) -> "FinetuneConfig":
        if min(self.steps, self.batch_size, self.top_k, self.rank, self.eval_seqs) < 1:
            raise ValueError("steps, batch_size, top_k, rank and eval_seqs must be >= 1")
        if self.seq_len < 2:
            raise ValueError("seq_len must be >= 2")
        return self


@dataclasses.dataclass
class Job:
    """A fine-tuning job ready to run: its settings, the frozen base model and the token data."""
    fc: FinetuneConfig
    cfg: LlamaConfig
    params: Params  # the frozen base
    train: np.ndarray  # [N, n] int32
    heldout: np.ndarray  # [M, n] int32
    source: str = ""


def _schedule(fc: FinetuneConfig):
    return optax.warmup_cosine_decay_schedule(0.0, fc.lr, min(fc.warmup, fc.steps), max(fc.steps, fc.warmup + 1), fc.lr * 0.1)


def make_optimizer(fc: FinetuneConfig):
    """AdamW on the "lora" subtree, set_to_zero on the "base" subtree."""
    adamw = optax.chain(optax.clip_by_global_norm(fc.clip), optax.adamw(_schedule(fc), weight_decay=fc.weight_decay))

    def labels(tree):
        return {name: jax.tree_util.tree_map(lambda _: name, sub) for name, sub in tree.items()}

    return optax.multi_transform({"lora": adamw, "base": optax.set_to_zero()}, labels)


def train_step(cfg: LlamaConfig, fc: FinetuneConfig, opt, tree: dict, opt_state, tokens: jax.Array):
    """One update of tree = {"base": Params, "lora": LoraParams} on tokens [B, n]; returns (tree, opt_state, loss)."""

    def loss(tree):
        params = apply_lora(jax.lax.stop_gradient(tree["base"]), tree["lora"], fc.alpha)
        total, count = nll_sum(params, cfg, tokens, topk_attention(fc.top_k))
        return total / count

    value, grads = jax.value_and_grad(loss)(tree)
    updates, opt_state = opt.update(grads, opt_state, tree)
    return optax.apply_updates(tree, updates), opt_state, value


_nll_sum_jit = jax.jit(nll_sum, static_argnums=(1, 3))


def heldout_ppl(params: Params, cfg: LlamaConfig, rows: np.ndarray, attn_fn: AttentionFn, batch: int) -> float:
    """Perplexity over rows [M, n] (in batches of `batch`, the last one may be smaller)."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        s, c = _nll_sum_jit(params, cfg, jnp.asarray(rows[i:i + batch], jnp.int32), attn_fn)
        total, count = total + float(s), count + int(c)
    return math.exp(total / max(count, 1))


def train(job: Job, progress: bool = True) -> tuple[Params, LoraParams, list]:
    """Fine-tune the LoRA factors (resuming from fc.out's latest checkpoint);
    returns (the base as the optimizer left it, lora, per-step losses of this call)."""
    fc, cfg = job.fc, job.cfg
    out = Path(fc.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    lora = init_lora(job.params, fc.rank, jax.random.key(fc.seed))
    opt = make_optimizer(fc)
    tree = {"base": job.params, "lora": lora}
    opt_state = opt.init(tree)
    step_fn = jax.jit(functools.partial(train_step, cfg, fc, opt), donate_argnums=(1,))
    options = ocp.CheckpointManagerOptions(save_interval_steps=fc.save_every, max_to_keep=fc.keep)
    losses = []
    with ocp.CheckpointManager(out / "checkpoints", options=options) as mngr, open(out / "metrics.jsonl", "a") as log:
        start = mngr.latest_step() or 0
        if start:
            restored = mngr.restore(start, args=ocp.args.StandardRestore({"lora": lora, "opt": opt_state}))
            tree, opt_state = {"base": job.params, "lora": restored["lora"]}, restored["opt"]
        bar = tqdm(range(start, fc.steps), initial=start, total=fc.steps, desc="finetune", disable=not progress)
        t0 = time.perf_counter()
        for step in bar:
            rows = job.train[np.sort(batch_indices(fc, len(job.train), step))]
            tree, opt_state, loss = step_fn(tree, opt_state, jnp.asarray(rows, jnp.int32))
            losses.append(float(loss))
            done = step + 1
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if done % fc.log_every == 0 or done == fc.steps:
                rec = {"step": done, "loss": losses[-1], "lr": float(_schedule(fc)(done)), "time_s": time.perf_counter() - t0}
                log.write(json.dumps(rec) + "\n")
                log.flush()
            mngr.save(done, args=ocp.args.StandardSave({"lora": tree["lora"], "opt": opt_state}), force=done == fc.steps)
        mngr.wait_until_finished()
    return tree["base"], tree["lora"], losses


# ---------------------------------------------------------------- entry points


def load_job(fc: FinetuneConfig) -> Job:
    """Load the backbone and the packed corpora (fetched and packed on first use)."""
    from adore_jax.hub import resolve_model
    from models.loading import load_model, resolve_dtype
    from train.data import load_or_build_packed

    model = load_model(resolve_model(fc.model or None), dtype=resolve_dtype(fc.dtype), layers="stacked")
    data_dir = load_or_build_packed(fc.data_dir or None, model.tokenizer, fc.seq_len, fc.mix or None)
    train_rows, heldout_rows = (np.load(Path(data_dir) / f"{s}.npy", mmap_mode="r") for s in ("train", "heldout"))
    if len(train_rows) < fc.batch_size:
        raise ValueError(f"only {len(train_rows)} training sequences of {fc.seq_len} tokens; lower batch_size")
    return Job(fc, model.cfg, model.params, train_rows, heldout_rows, model.source)


def perplexities(job: Job, params: Params) -> dict:
    """{"topk": ppl, "full": ppl} on the first eval_seqs held-out rows."""
    rows = np.asarray(job.heldout[: job.fc.eval_seqs])
    fns = {"topk": topk_attention(job.fc.top_k), "full": reference_attention}
    return {name: heldout_ppl(params, job.cfg, rows, fn, job.fc.batch_size) for name, fn in fns.items()}


def report_table(report: dict) -> str:
    """Markdown table of held-out perplexity (rows: attention; columns: before/after)."""
    ppl = report["heldout_ppl"]
    K = report["config"]["top_k"]
    lines = ["| attention | before | after | change |", "|---|---|---|---|"]
    for name, label in (("topk", f"top-{K}"), ("full", "full")):
        b, a = ppl["before"][name], ppl["after"][name]
        lines.append(f"| {label} | {b:.3f} | {a:.3f} | {100 * (a / b - 1):+.1f}% |")
    return "\n".join(lines)


def model_card(report: dict) -> str:
    """The adapter's MODEL_CARD.md: what it was trained on and how, and its held-out perplexities."""
    fc = report["config"]
    return "\n".join([
        f"# Stage-1 LoRA adapter: top-{fc['top_k']} sparse attention", "",
        f"- Backbone: {report['model']}",
        f"- LoRA rank {fc['rank']}, alpha {fc['alpha']}, on wq, wk, wv, wo; the base frozen",
        f"- Data: {fc.get('mix') or 'books only'} (the training split), {fc['seq_len']} tokens a sequence, batch {fc['batch_size']}, "
        f"{fc['steps']} steps, lr {fc['lr']} (AdamW, warmup {fc['warmup']})",
        f"- Command: `{report['command']}`",
        f"- Use: `adore generate --adapter DIR ...`, `adore eval ppl --adapter DIR ...`, or "
        "`load_model(..., adapter=DIR)`", "",
        f"Held-out perplexity ({report['heldout']}), before and after:", "",
        report_table(report), ""])


def run(job: Job, command: str = "", progress: bool = True) -> dict:
    """Perplexities before, training, perplexities after the merge; writes the adapter
    folder OUT/adapter (factors, adapter.json, MODEL_CARD.md) and OUT/report.json."""
    fc = job.fc
    out = Path(fc.out).absolute()
    if (out / "adapter").exists():
        raise ValueError(f"{out / 'adapter'} exists: remove it or pick another --out")
    t0 = time.perf_counter()
    before = perplexities(job, job.params)
    base, lora, losses = train(job, progress=progress)
    after = perplexities(job, apply_lora(base, lora, fc.alpha))
    report = {
        "command": command,
        "model": job.source,
        "config": dataclasses.asdict(fc),
        "heldout": f"Persuasion, first {min(fc.eval_seqs, len(job.heldout))} packed sequences of {fc.seq_len} tokens",
        "heldout_ppl": {"before": before, "after": after},
        "train_loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None},
        "time_s": time.perf_counter() - t0,
    }
    adapter = save_adapter(out / "adapter", lora, fc.alpha, {k: report[k] for k in ("model", "config", "heldout_ppl")})
    (adapter / "MODEL_CARD.md").write_text(model_card(report))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def parse_config(argv) -> FinetuneConfig:
    """FinetuneConfig from --config FILE.toml plus --field value overrides."""
    return read_config(FinetuneConfig, argv, "adore finetune-sparse", "LoRA fine-tune to top-K sparse attention: an adapter")


def main(argv=None, prog: str = "adore finetune-sparse") -> int:
    """`adore finetune-sparse`: fine-tune the backbone to top-K sparse attention with LoRA; exit status."""
    argv = sys.argv[1:] if argv is None else argv
    fc = parse_config(argv)
    report = run(load_job(fc), " ".join([prog, *argv]))
    print(report_table(report))
    print(json.dumps({"adapter": str(Path(fc.out).absolute() / "adapter"), "report": str(Path(fc.out).absolute() / "report.json")}))
    return 0


if __name__ == "__main__":
    from adore_jax.cli import run_main

    sys.exit(run_main(main, None, "python -m train.finetune"))
