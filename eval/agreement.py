"""Agreement of each policy's greedy output with full attention's.

Prompts: instruct requests in the tokenizer's chat template, and continuations
of passages of the held-out book. Per (policy, budget, prompt kind): token
exact-match rate (eval.metrics.token_match_rate), ROUGE-L F-measure of the
decoded texts (1 when the texts are identical, even empty ones) and corpus
BLEU-4 against the full-attention outputs.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from eval.common import (PolicySpec, RowCache, batches, build, chat_ids, controller_fingerprint, controller_note,
                         fingerprint, md_table, run_key, write_outputs)
from eval.metrics import corpus_bleu, rouge_l, token_match_rate

CHAT_PROMPTS = (
    "Explain why the sky is blue in simple terms.",
    "Write a short poem about autumn leaves.",
    "What are three tips for staying focused while studying?",
    "Describe how a bicycle works.",
    "Give me a recipe for a simple tomato soup.",
    "Summarize the plot of a fairy tale of your choice.",
    "What is the difference between weather and climate?",
    "Write a polite email declining a meeting invitation.",
    "How do plants make their food?",
    "List five animals that live in the ocean and one fact about each.",
    "Explain what a prime number is, with examples.",
    "Write a short story about a robot who learns to paint.",
    "What should I pack for a weekend hiking trip?",
    "Why do we have seasons on Earth?",
    "Describe the water cycle step by step.",
    "Give advice to someone starting their first job.",
    "Explain how to make a paper airplane.",
    "What are the benefits of reading books?",
    "Write a haiku about the sea.",
    "How does a rainbow form?",
    "Explain the rules of chess briefly.",
    "What is photosynthesis and why is it important?",
    "Describe a typical day in the life of a farmer.",
    "Write a limerick about a cat.",
    "How can I save money on groceries?",
    "Explain what gravity is to a ten-year-old.",
    "Give me three ideas for a birthday party.",
    "What makes a good friend?",
    "Describe the city of Paris in a few sentences.",
    "How do vaccines help the body fight disease?",
    "Write a short dialogue between a teacher and a student.",
    "What are some ways to reduce plastic waste?",
)


def chat_prompts(tokenizer, n: int) -> list[dict]:
    """n instruct prompts [{kind: 'chat', ids}] (cycling the built-in list)."""
    return [dict(kind="chat", ids=chat_ids(tokenizer, CHAT_PROMPTS[i % len(CHAT_PROMPTS)])) for i in range(n)]


def book_prompts(ids: Sequence[int], n: int, length: int) -> list[dict]:
    """n continuation prompts [{kind: 'book', ids}] of `length` tokens, evenly spaced over ids."""
    if n < 1:
        return []
    if len(ids) < length:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one prompt of {length}")
    starts = np.linspace(0, len(ids) - length, n).astype(int)
    return [dict(kind="book", ids=list(ids[s : s + length])) for s in starts]


def _outputs(params, cfg, prompts, policy, pp, max_new_tokens, batch_size, chunk, bar) -> list[list[int]]:
    from adore_jax import engine

    out = []
    for sl in batches(len(prompts), batch_size):
        out += engine.generate(params, cfg, [p["ids"] for p in prompts[sl]], max_new_tokens, policy=policy,
                               policy_params=pp, chunk=chunk)
        bar.update(sl.stop - sl.start)
    return out


def _scores(hyps, refs, decode) -> dict:
    """Agreement metrics of token lists hyps vs refs (decode: ids -> text)."""
    h_txt, r_txt = [decode(h) for h in hyps], [decode(r) for r in refs]
    rouge = [1.0 if a == b else rouge_l(a, b).fmeasure for a, b in zip(h_txt, r_txt)]
    return dict(match=float(np.mean([token_match_rate(a, b) for a, b in zip(hyps, refs)])),
                rouge_l=float(np.mean(rouge)), bleu=corpus_bleu(h_txt, r_txt), prompts=len(hyps))


def run_agreement(params, cfg, tokenizer, prompts: Sequence[dict], specs: Sequence[PolicySpec], budgets: Sequence[int],
                  max_new_tokens: int = 32, batch_size: int = 16, chunk: int = 128, controller=None,
                  rebuild_every: int = 1, meta: Optional[dict] = None, resume_dir=None) -> dict:
    """Greedy outputs of each (policy, budget) vs full attention on prompts [{kind, ids}];
    resume_dir: keep finished outputs there and reuse them (eval.common.RowCache).
    Returns the JSON-ready result: `results` [{policy, budget, kind, match, rouge_l,
    bleu, prompts}] and `skipped` (m >= every prompt + answer: equals full)."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    kinds = sorted({p["kind"] for p in prompts})
    longest = max(len(p["ids"]) for p in prompts)
    runs = [(s, m) for s in specs for m in ([None] if s.name == "full" else budgets)]
    skipped = [dict(policy=s.label, budget=m, reason="m >= prompt + answer: equals full attention")
               for s, m in runs if m is not None and m >= longest + max_new_tokens]
    runs = [(s, m) for s, m in runs if m is None or m < longest + max_new_tokens]
    results, examples = [], {}
    note = controller_note(specs, cfg, controller)  # before the runs: says what they use
    done = RowCache(resume_dir, "agreement", run_key(meta, prompts=fingerprint(*[p["ids"] for p in prompts]),
                                                     kinds=[p["kind"] for p in prompts], max_new_tokens=max_new_tokens,
                                                     chunk=chunk, controller=controller_fingerprint(cfg, controller),
                                rebuild_every=rebuild_every))

    def outputs(spec, m):
        """(token lists, seconds) of one (policy, budget), from the RowCache when there."""
        got = done.get(spec.label, m)
        if got is not None:
            bar.update(len(prompts))
            return got
        policy, pp, _ = build(spec, cfg, m or longest, controller, rebuild_every)
        t0 = time.perf_counter()
        out = _outputs(params, cfg, prompts, policy, pp, max_new_tokens, batch_size, chunk, bar)
        got = (out, round(time.perf_counter() - t0, 2))
        done.put(spec.label, m, got)
        return got

    with tqdm(total=(len(runs) + 1) * len(prompts), desc="agreement", unit="prompt") as bar:
        ref, _ = outputs(PolicySpec("full", "full"), None)
        for spec, m in runs:
            bar.set_postfix_str(f"{spec.label} m={m or 'all'}")
            out, sec = outputs(spec, m)
            for k in kinds:
                idx = [i for i, p in enumerate(prompts) if p["kind"] == k]
                results.append(dict(policy=spec.label, budget=m, kind=k, seconds=sec,
                                    **_scores([out[i] for i in idx], [ref[i] for i in idx], decode)))
                examples[f"{spec.label} m={m or 'all'} {k}"] = decode(out[idx[0]])[:200]
    for k in kinds:
        i = next(i for i, p in enumerate(prompts) if p["kind"] == k)
        examples[f"reference {k}"] = decode(ref[i])[:200]
    return dict(kind="agreement", **(meta or {}), prompts={k: sum(p["kind"] == k for p in prompts) for k in kinds},
                prompt_tokens=[min(len(p["ids"]) for p in prompts), longest], max_new_tokens=max_new_tokens,
                chunk=chunk, budgets=list(budgets), policies=[s.label for s in specs], rebuild_every=rebuild_every,
                controller=note, results=results, skipped=skipped, examples=examples)


def agreement_table(res: dict) -> str:
    """Markdown: one row per (policy, budget, kind) with match rate, ROUGE-L, BLEU."""
    rows = [[r["policy"], r["budget"] or "all", r["kind"], r["prompts"], r["match"], r["rouge_l"], r["bleu"]]
            for r in res["results"]]
    rows += [[s["policy"], s["budget"], "all", "", "=full", "=full", "=full"] for s in res["skipped"]]
    return md_table(["policy", "m", "kind", "prompts", "token match", "ROUGE-L", "BLEU"], rows)


def write_agreement(res: dict, out_dir) -> dict:
    """Write agreement.json and agreement.md into out_dir; returns {kind: path}."""
    md = (f"Agreement with full attention (greedy, {res['max_new_tokens']} new tokens; prompts {res['prompts']}, "
          f"{res['prompt_tokens'][0]}-{res['prompt_tokens'][1]} tokens):\n\n{agreement_table(res)}\n")
    return write_outputs(out_dir, "agreement", res, md)
