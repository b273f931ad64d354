"""Pass-key retrieval accuracy by needle depth and cache budget, per policy.

Each trial hides a random 5-digit key at a relative depth of a filler prompt
of about L tokens (eval.passkey), wrapped in the chat template when the
tokenizer has one; the model answers greedily in a few tokens and passes when
the first 5-digit number of its answer is the key. Trials use fixed seeds, so
every policy and budget sees the same prompts. Prompts are prefilled in chunks
(the policy cuts the cache back to m after each chunk), then decoded.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from eval.common import (PolicySpec, RowCache, batches, build, controller_fingerprint, chat_ids, controller_note, fingerprint, md_table,
                         new_figure, run_key, write_outputs)
from eval.passkey import make_passkey_prompt, score_passkey


def passkey_prompts(tokenizer, length: int, depths: Sequence[float], trials: int, seed: int = 0) -> list[dict]:
    """Prompts [{depth, trial, key, ids}] of about `length` tokens each (chat-wrapped),
    trials per depth; trial t at depth index d draws its key from seed (seed, d, t)."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    overhead = len(chat_ids(tokenizer, make_passkey_prompt(np.random.default_rng(0), 0, 0.0, tokenizer=tokenizer).text))
    filler = max(1, length - overhead)
    out = []
    for d, depth in enumerate(depths):
        for t in range(trials):
            p = make_passkey_prompt(np.random.default_rng([seed, d, t]), filler, float(depth), tokenizer=tokenizer)
            out.append(dict(depth=float(depth), trial=t, key=p.key, ids=chat_ids(tokenizer, p.text)))
    return out


def answers(params, cfg, tokenizer, prompts: Sequence[dict], policy, policy_params=None, max_new_tokens: int = 12,
            batch_size: int = 16, chunk: int = 128, bar=None) -> list[str]:
    """Greedy answers (decoded text) for the prompts, in batches of batch_size."""
    from adore_jax import engine

    out = []
    for sl in batches(len(prompts), batch_size):
        ids = engine.generate(params, cfg, [p["ids"] for p in prompts[sl]], max_new_tokens, policy=policy,
                              policy_params=policy_params, chunk=chunk)
        out += [tokenizer.decode(r, skip_special_tokens=True) for r in ids]
        if bar is not None:
            bar.update(sl.stop - sl.start)
    return out


def _cells(params, cfg, tokenizer, prompts, depths, spec, m, max_new_tokens, batch_size, chunk, controller,
           rebuild_every, bar) -> list[dict]:
    """[{depth, accuracy, trials, seconds, example}] of one (policy, budget m)."""
    policy, pp, _ = build(spec, cfg, m, controller, rebuild_every)
    t0 = time.perf_counter()
    texts = answers(params, cfg, tokenizer, prompts, policy, pp, max_new_tokens, batch_size, chunk, bar)
    ok = np.array([score_passkey(t, p["key"]) for t, p in zip(texts, prompts)])
    sec = round(time.perf_counter() - t0, 2)
    rows = []
    for d in depths:
        sel = np.array([p["depth"] == d for p in prompts])
        rows.append(dict(depth=d, accuracy=float(ok[sel].mean()), trials=int(sel.sum()), seconds=sec,
                         example=texts[int(np.argmax(sel))][:80]))
    return rows


def run_passkey(params, cfg, tokenizer, prompts: Sequence[dict], specs: Sequence[PolicySpec], budgets: Sequence[int],
                max_new_tokens: int = 12, batch_size: int = 16, chunk: int = 128, controller=None,
                rebuild_every: int = 1, meta: Optional[dict] = None, resume_dir=None) -> dict:
    """Accuracy of every (policy, budget, depth) cell over `prompts` (passkey_prompts);
    resume_dir: keep finished cells there and reuse them (eval.common.RowCache).
    Returns the JSON-ready result: settings, `results` [{policy, budget, depth,
    accuracy, trials}] (budget None for full), `skipped` (m >= prompt + answer)."""
    depths = sorted({p["depth"] for p in prompts})
    longest = max(len(p["ids"]) for p in prompts)
    runs, skipped = [], []
    for s in specs:
        for m in ([None] if s.name == "full" else budgets):
            if m is not None and m >= longest + max_new_tokens:
                skipped.append(dict(policy=s.label, budget=m, reason="m >= prompt + answer: equals full attention"))
            else:
                runs.append((s, m))
    results = []
    note = controller_note(specs, cfg, controller)  # before the runs: says what they use
    done = RowCache(resume_dir, "passkey", run_key(meta, prompts=fingerprint(*[p["ids"] for p in prompts]),
                                                   keys=[p["key"] for p in prompts], max_new_tokens=max_new_tokens,
                                                   chunk=chunk, controller=controller_fingerprint(cfg, controller),
                                rebuild_every=rebuild_every))
    with tqdm(total=len(runs) * len(prompts), desc="passkey", unit="prompt") as bar:
        for spec, m in runs:
            bar.set_postfix_str(f"{spec.label} m={m or 'all'}")
            rows = done.get(spec.label, m)
            if rows is None:
                rows = _cells(params, cfg, tokenizer, prompts, depths, spec, m or longest, max_new_tokens, batch_size,
                              chunk, controller, rebuild_every, bar)
                rows = [dict(policy=spec.label, budget=m, **r) for r in rows]
                done.put(spec.label, m, rows)
            else:
                bar.update(len(prompts))
            results += rows
    lens = [len(p["ids"]) for p in prompts]
    return dict(kind="passkey", **(meta or {}), prompt_tokens=[min(lens), max(lens)], depths=depths,
                trials=len(prompts) // len(depths), max_new_tokens=max_new_tokens, chunk=chunk, budgets=list(budgets),
                policies=[s.label for s in specs], rebuild_every=rebuild_every,
                controller=note, results=results, skipped=skipped)


def _grid(res: dict, policy: str) -> np.ndarray:
    """[depths, budgets] accuracy of one policy (NaN: not run; full fills every column)."""
    g = np.full((len(res["depths"]), len(res["budgets"])), np.nan)
    for r in res["results"]:
        if r["policy"] == policy:
            cols = range(len(res["budgets"])) if r["budget"] is None else [res["budgets"].index(r["budget"])]
            for c in cols:
                g[res["depths"].index(r["depth"]), c] = r["accuracy"]
    return g


def passkey_table(res: dict) -> str:
    """Markdown: mean accuracy over depths, one row per policy, one column per budget."""
    skip = {(s["policy"], s["budget"]) for s in res["skipped"]}
    rows = []
    for p in res["policies"]:
        g = _grid(res, p)
        rows.append([p] + ["=full" if (p, m) in skip else (float(np.nanmean(g[:, j])) if not np.isnan(g[:, j]).all() else "")
                           for j, m in enumerate(res["budgets"])])
    return md_table(["policy"] + [f"m={m}" for m in res["budgets"]], rows)


def plot_passkey(res: dict, path=None):
    """Heat maps of accuracy (rows: depth, columns: budget), one panel per policy."""
    pols = res["policies"]
    fig, axes = new_figure(2.6 * len(pols) + 1, 3.4, ncols=len(pols))
    axes = axes if isinstance(axes, list) else [axes]
    for ax, p in zip(axes, pols):
        g = _grid(res, p)
        im = ax.imshow(g, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(g):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        ax.set_xticks(range(len(res["budgets"])), [str(m) for m in res["budgets"]], fontsize=7)
        ax.set_yticks(range(len(res["depths"])), [f"{d:.2f}" for d in res["depths"]], fontsize=7)
        ax.set_xlabel("budget m")
        ax.set_title(p, fontsize=9)
    axes[0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes, shrink=0.8, label="accuracy")
    fig.suptitle(f"Pass-key retrieval, prompts of {res['prompt_tokens'][1]} tokens, {res['trials']} trials per cell")
    if path is not None:
        fig.savefig(path)
    return fig


def write_passkey(res: dict, out_dir) -> dict:
    """Write passkey.json, passkey.md and passkey.png (heat maps) into out_dir."""
    md = (f"Pass-key accuracy (mean over depths {res['depths']}), prompts of {res['prompt_tokens'][0]}-"
          f"{res['prompt_tokens'][1]} tokens, {res['trials']} trials per depth:\n\n{passkey_table(res)}\n")
    return write_outputs(out_dir, "passkey", res, md, plot_passkey)
