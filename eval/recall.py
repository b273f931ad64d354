"""Recall and precision of the true top-K attention set within what a policy keeps.

The target: for query q, the K keys of highest full attention (averaged over
layers and heads; train.labels.attention_labels). The kept set of a policy at
query q: the positions its cache holds after streaming tokens 0..q through
the decode step (engine.score over that prefix). For oracle,
whose cache keeps every token and which instead restricts each query to its
top-m keys, the kept set is that restricted view of query q (plus q itself).
recall = |kept & topK| / |topK|, precision = |kept & topK| / |kept|, averaged
over segments and query positions.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from eval.common import (PolicySpec, RowCache, batches, build, controller_fingerprint, controller_note, fingerprint, md_table, new_figure,
                         run_key, write_outputs)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _oracle_view(params, cfg, policy, cache, tok, pos):
    """Positions [B, S] of the slots the oracle lets query (tok, pos) [B, 1] attend to."""
    from models.llama import forward

    mass = forward(params, cfg, tok, pos, cache, with_stats=True, logits_rows=jnp.zeros_like(pos)).mass
    return policy.restrict(None, cache, pos, mass).pos


def cache_after(params, cfg, tokens, prefill: int = 1, policy=None, policy_params=None, chunk: int = 512):
    """The policy's cache after streaming all of tokens [B, k] (prefill, then one decode step each)."""
    from adore_jax import engine

    tokens = np.asarray(tokens, np.int32)
    ext = np.concatenate([tokens, tokens[:, -1:]], axis=1)  # score feeds all but the last token
    return engine.score(params, cfg, ext, min(prefill, tokens.shape[1]), policy=policy,
                        policy_params=policy_params, chunk=chunk)[1]


def kept_positions(params, cfg, tokens, q: int, policy, policy_params=None, prefill: int = 1, chunk: int = 512) -> np.ndarray:
    """[B, S] int positions held for query q (-1: empty slot), streaming tokens [B, >q]."""
    tokens = np.asarray(tokens, np.int32)
    if policy.two_pass:
        cache = cache_after(params, cfg, tokens[:, :q], prefill, policy, policy_params, chunk)
        pos = jnp.full((tokens.shape[0], 1), q, jnp.int32)
        view = np.asarray(_oracle_view(params, cfg, policy, cache, jnp.asarray(tokens[:, q:q + 1]), pos))
        return np.concatenate([view, np.full((len(view), 1), q)], axis=1)
    return np.asarray(cache_after(params, cfg, tokens[:, : q + 1], prefill, policy, policy_params, chunk).pos)


def set_scores(kept: np.ndarray, top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall [B], precision [B]) of kept positions [B, S] (-1 ignored) against
    top-K masks top [B, q + 1] bool over positions 0..q."""
    q1 = top.shape[1]
    mask = np.zeros_like(top)
    for b, row in enumerate(kept):
        row = row[(row >= 0) & (row < q1)]
        mask[b, row] = True
    hit = (mask & top).sum(1)
    return hit / np.maximum(top.sum(1), 1), hit / np.maximum(mask.sum(1), 1)


def query_positions(n: int, fractions: Sequence[float]) -> list[int]:
    """Query positions round(f * n) - 1 for fractions f in (0, 1], at least 2."""
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"query fractions must be in (0, 1], got {list(fractions)}")
    return sorted({max(2, round(f * n) - 1) for f in fractions})


def _run_one(params, cfg, tokens, labels, qs, spec, m, parts, prefill, controller, rebuild_every, chunk, bar) -> dict:
    """The result row of one (policy, budget): means over segments and query positions."""
    policy, pp, _ = build(spec, cfg, m, controller, rebuild_every)
    t0, rec, prec, size = time.perf_counter(), [], [], []
    for sl, lab in zip(parts, labels):
        for q in qs:
            kept = kept_positions(params, cfg, tokens[sl], q, policy, pp, prefill, chunk)
            r, p = set_scores(kept, lab[:, q, : q + 1])
            rec += r.tolist()
            prec += p.tolist()
            size += ((kept >= 0) & (kept <= q)).sum(1).tolist()
            bar.update()
    return dict(policy=spec.label, budget=None if spec.name == "full" else m, recall=float(np.mean(rec)),
                precision=float(np.mean(prec)), kept=float(np.mean(size)), seconds=round(time.perf_counter() - t0, 2))


def run_recall(params, cfg, tokens, specs: Sequence[PolicySpec], budgets: Sequence[int], topk: int = 32,
               fractions: Sequence[float] = (1.0,), prefill: int = 1, batch_size: int = 8, controller=None,
               rebuild_every: int = 1, chunk: int = 512, meta: Optional[dict] = None, resume_dir=None) -> dict:
    """Recall/precision of the top-`topk` keys (labels of full attention) within each
    policy's kept set, for segments tokens [N, n] and queries at `fractions` of n.
    resume_dir: keep finished rows there and reuse them (eval.common.RowCache).
    Returns the JSON-ready result: settings and `results` [{policy, budget, recall,
    precision, kept, seconds}]; m >= q + 1 keeps everything (recall 1)."""
    from train.labels import attention_labels

    tokens = np.asarray(tokens, np.int32)
    N, n = tokens.shape
    if topk < 1:
        raise ValueError(f"top-K must be >= 1, got {topk}")
    qs = query_positions(n, fractions)
    block = math.gcd(n, 256)
    parts = batches(N, batch_size)
    runs = [(s, m) for s in specs for m in ([max(budgets)] if s.name == "full" else budgets)]
    results, labels = [], None
    note = controller_note(specs, cfg, controller)  # before the runs: says what they use
    done = RowCache(resume_dir, "recall", run_key(meta, tokens=fingerprint(tokens), topk=topk, queries=qs, prefill=prefill,
                                                  chunk=chunk, controller=controller_fingerprint(cfg, controller),
                                rebuild_every=rebuild_every))
    with tqdm(total=len(runs) * len(parts) * len(qs), desc="recall", unit="run") as bar:
        for spec, m in runs:
            bar.set_postfix_str(f"{spec.label} m={m}")
            row = done.get(spec.label, m)
            if row is None:
                if labels is None:
                    labels = [np.asarray(attention_labels(params, cfg, tokens[sl], topk, block)[1]) for sl in parts]
                row = _run_one(params, cfg, tokens, labels, qs, spec, m, parts, prefill, controller, rebuild_every, chunk, bar)
                done.put(spec.label, m, row)
            else:
                bar.update(len(parts) * len(qs))
            results.append(row)
    return dict(kind="recall", **(meta or {}), length=n, segments=N, topk=topk, queries=qs, prefill=prefill,
                budgets=list(budgets), policies=[s.label for s in specs], rebuild_every=rebuild_every,
                controller=note, results=results)


def recall_table(res: dict, key: str = "recall") -> str:
    """Markdown: policy rows, budget columns (full attention: one value for all)."""
    cells = {(r["policy"], r["budget"]): r[key] for r in res["results"]}
    rows = []
    for p in res["policies"]:
        full = cells.get((p, None))
        rows.append([p] + [full if full is not None else cells.get((p, m), "") for m in res["budgets"]])
    return md_table(["policy"] + [f"m={m}" for m in res["budgets"]], rows)


def plot_recall(res: dict, path=None):
    """Recall and precision of the top-K set against budget m, a line per policy."""
    fig, (a1, a2) = new_figure(11, 4.2, ncols=2)
    for p in res["policies"]:
        pts = sorted((r["budget"], r["recall"], r["precision"]) for r in res["results"]
                     if r["policy"] == p and r["budget"] is not None)
        if pts:
            m, rec, prec = zip(*pts)
            a1.plot(m, rec, marker="o", label=p)
            a2.plot(m, prec, marker="o", label=p)
    for ax, name in ((a1, "recall"), (a2, "precision")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(res["budgets"], [str(m) for m in res["budgets"]])
        ax.set_xlabel("cache budget m (slots)")
        ax.set_ylabel(f"top-{res['topk']} {name}")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
    a1.legend(fontsize=8)
    fig.suptitle(f"True top-{res['topk']} keys kept, n = {res['length']}, queries {res['queries']}")
    if path is not None:
        fig.savefig(path)
    return fig


def write_recall(res: dict, out_dir) -> dict:
    """Write recall.json, recall.md and recall.png into out_dir; returns {kind: path}."""
    md = (f"Top-{res['topk']} recall on {res.get('text', 'the given tokens')}, n = {res['length']}, "
          f"{res['segments']} segments, query positions {res['queries']}.\n\nRecall:\n\n{recall_table(res)}\n\n"
          f"Precision:\n\n{recall_table(res, 'precision')}\n")
    return write_outputs(out_dir, "recall", res, md, plot_recall)
