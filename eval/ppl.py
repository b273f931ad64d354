"""Streaming perplexity against cache budget, every token through the real decode step.

B disjoint segments of L tokens run as one batch: the first `prefill` tokens are
prefilled, then each later token is fed by one decode step (engine.score), so the
policy evicts exactly as it would while generating. Perplexity is exp(mean NLL)
over all scored tokens; `ppl_after_budget` counts only positions >= m, where the
cache is full and policies differ. Combinations with m >= L are skipped (equal
to full attention by construction) and recorded as such.
"""

from __future__ import annotations

import math
import time
from typing import Optional, Sequence

import numpy as np
from matplotlib.ticker import ScalarFormatter
from tqdm import tqdm

from eval.common import (PolicySpec, RowCache, batches, build, controller_fingerprint, controller_note, fingerprint, md_table, new_figure,
                         run_key, write_outputs)


def streaming_nll(params, cfg, tokens, policy=None, policy_params=None, prefill: int = 1, chunk: int = 512,
                  kv_dtype: str = "auto") -> np.ndarray:
    """Negative log-likelihood in nats [B, L - prefill] of tokens[:, prefill:] for tokens [B, L],
    each token fed through one decode step of `policy` (default: full attention) over
    cache slots of `kv_dtype` (EngineConfig.kv_dtype)."""
    from adore_jax import engine
    from adore_jax.policies import full_policy

    lp, _ = engine.score(params, cfg, tokens, prefill, policy=policy or full_policy, policy_params=policy_params, chunk=chunk,
                         kv_dtype=kv_dtype)
    return -lp.astype(np.float64)


def _summary(nll: np.ndarray, prefill: int, budget: Optional[int]) -> dict:
    """ppl over all scored tokens and over positions >= budget (nll [B, L - prefill])."""
    pos = prefill + np.arange(nll.shape[1])
    tail = nll[:, pos >= (budget or 0)]
    return dict(ppl=math.exp(nll.mean()), nll=float(nll.mean()), tokens=int(nll.size),
                ppl_after_budget=math.exp(tail.mean()) if tail.size else float("nan"))


def _run_one(params, cfg, tokens, spec, m, budgets, prefill, parts, controller, rebuild_every, chunk, kv_dtype, bar) -> dict:
    """The result row of one (policy, budget) over all segments."""
    L = tokens.shape[1]
    policy, pp, _ = build(spec, cfg, m or L, controller, rebuild_every)
    t0, nll = time.perf_counter(), []
    for sl in parts:
        nll.append(streaming_nll(params, cfg, tokens[sl], policy, pp, prefill, chunk, kv_dtype))
        bar.update()
    nll = np.concatenate(nll)
    row = dict(policy=spec.label, budget=m, **_summary(nll, prefill, m), seconds=round(time.perf_counter() - t0, 2))
    if spec.name == "full":
        row["ppl_after_budget_by_m"] = {str(b): _summary(nll, prefill, b)["ppl_after_budget"] for b in budgets if b < L}
    return row


def run_ppl(params, cfg, tokens, specs: Sequence[PolicySpec], budgets: Sequence[int], prefill: int = 1,
            batch_size: int = 8, controller=None, rebuild_every: int = 1, chunk: int = 512, meta: Optional[dict] = None,
            resume_dir=None, kv_dtype: str = "auto") -> dict:
    """Streaming perplexity of every (policy, budget) over segments tokens [N, L] int,
    the cache slots of `kv_dtype` (part of the result, and of the resume key unless "auto").

    Segments run in batches of batch_size. resume_dir: keep finished rows there
    (eval.common.RowCache) and reuse them when run again with the same settings.
    Returns the result dict (JSON-ready): settings, `full` (the reference),
    `results` [{policy, budget, ppl, nll, ppl_after_budget, tokens, seconds}],
    `skipped` [{policy, budget, reason}]."""
    tokens = np.asarray(tokens, np.int32)
    N, L = tokens.shape
    if not 1 <= prefill < L:
        raise ValueError(f"prefill must be in [1, {L - 1}], got {prefill}")
    runs, skipped = [], []
    for s in specs:
        for m in ([None] if s.name == "full" else budgets):
            if m is not None and m >= L:
                skipped.append(dict(policy=s.label, budget=m, reason=f"m >= L = {L}: equals full attention"))
            else:
                runs.append((s, m))
    if not any(s.name == "full" for s, _ in runs):
        runs.insert(0, (PolicySpec("full", "full"), None))  # the reference is always measured
    parts = batches(N, batch_size)
    results, full = [], None
    note = controller_note(specs, cfg, controller)  # before the runs: says what they use
    done = RowCache(resume_dir, "ppl", run_key(meta, tokens=fingerprint(tokens), prefill=prefill, chunk=chunk,
                                               budgets=list(budgets), controller=controller_fingerprint(cfg, controller),
                                rebuild_every=rebuild_every, **({} if kv_dtype == "auto" else dict(kv_dtype=kv_dtype))))
    with tqdm(total=len(runs) * len(parts), desc="ppl", unit="batch") as bar:
        for spec, m in runs:
            bar.set_postfix_str(f"{spec.label} m={m or 'all'}")
            row = done.get(spec.label, m)
            if row is None:
                row = _run_one(params, cfg, tokens, spec, m, budgets, prefill, parts, controller, rebuild_every, chunk,
                               kv_dtype, bar)
                done.put(spec.label, m, row)
            else:
                bar.update(len(parts))
            if spec.name == "full":
                full = row
            else:
                results.append(row)
    return dict(kind="ppl", **(meta or {}), kv_dtype=kv_dtype, length=L, segments=N, prefill=prefill, chunk=chunk,
                batch_size=batch_size,
                budgets=list(budgets), policies=[s.label for s in specs], rebuild_every=rebuild_every,
                controller=note, full=full, results=results, skipped=skipped)


def ppl_table(res: dict, key: str = "ppl") -> str:
    """Markdown: one row per policy, one column per budget m; `=full` where skipped."""
    cells = {(r["policy"], r["budget"]): r[key] for r in res["results"]}
    cells.update({(s["policy"], s["budget"]): "=full" for s in res["skipped"]})
    labels = [p for p in res["policies"] if p != "full"]
    f = res["full"]
    ref = [f[key] if key == "ppl" else f["ppl_after_budget_by_m"].get(str(m), "") for m in res["budgets"]]
    rows = [["full"] + ref]
    rows += [[p] + [cells.get((p, m), "") for m in res["budgets"]] for p in labels]
    return md_table(["policy"] + [f"m={m}" for m in res["budgets"]], rows)


def plot_ppl(res: dict, path=None):
    """Perplexity against budget m (log2 x axis), a line per policy, full as a
    horizontal line. Saved as PNG when path is given; returns the Figure."""
    fig, ax = new_figure()
    for p in [p for p in res["policies"] if p != "full"]:
        pts = sorted((r["budget"], r["ppl"]) for r in res["results"] if r["policy"] == p)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=p)
    ax.axhline(res["full"]["ppl"], color="black", linestyle="--", label="full")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(res["budgets"], [str(m) for m in res["budgets"]])
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("cache budget m (slots)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"Streaming perplexity, L = {res['length']}, {res['segments']} segments")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    if path is not None:
        fig.savefig(path)
    return fig


def write_ppl(res: dict, out_dir) -> dict:
    """Write ppl.json, ppl.md (tables) and ppl.png into out_dir; returns {kind: path}."""
    md = (f"Streaming perplexity on {res.get('text', 'the given tokens')}, L = {res['length']}, "
          f"{res['segments']} segments, prefill {res['prefill']}, cache slots {res.get('kv_dtype', 'auto')}."
          f"\n\nAll scored tokens:\n\n{ppl_table(res)}\n\n"
          f"Positions >= m only (cache full):\n\n{ppl_table(res, 'ppl_after_budget')}\n")
    return write_outputs(out_dir, "ppl", res, md, plot_ppl)
