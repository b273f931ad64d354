"""`adore eval {ppl,recall,passkey,agreement,all}`: argument parsing, presets, results folder.

Sizes come from a preset (`--size small`, the default, sized for a CPU; `--size
full`, the GPU run of docs/RESULTS.md); any flag given overrides its preset
value. Each evaluation writes KIND.json, KIND.md and (except agreement) KIND.png
into --out; `all` runs the four and writes README.md summarizing them.
This module imports nothing heavy at import time (the CLI builds its parser here).
"""

from __future__ import annotations

import datetime
import shlex
import sys
import time
from pathlib import Path

KINDS = ("ppl", "recall", "passkey", "agreement")
ALL_POLICIES = "full,window,streaming,h2o,tova,adore,adore-r8,oracle"
PRESETS = {
    "small": dict(
        policy=ALL_POLICIES, cache_size="32,64", batch_size=8, chunk=128,
        ppl=dict(length=256, segments=2, prefill=1),
        recall=dict(length=256, segments=2, prefill=1, topk=16, queries="1.0"),
        passkey=dict(length=256, depths="0,0.5,1", trials=2, max_new_tokens=12),
        agreement=dict(chat_prompts=4, book_prompts=2, prompt_length=128, max_new_tokens=24),
    ),
    "full": dict(
        policy=ALL_POLICIES, cache_size="64,128,256,512,1024", batch_size=16, chunk=512,
        ppl=dict(length=8192, segments=12, prefill=1),
        recall=dict(length=2048, segments=8, prefill=1, topk=64, queries="0.5,0.75,1.0"),
        passkey=dict(length=2048, depths="0,0.25,0.5,0.75,1", trials=100, max_new_tokens=12),
        agreement=dict(chat_prompts=32, book_prompts=32, prompt_length=1024, max_new_tokens=128),
    ),
}
# per-kind options: name -> (type, help)
OPTIONS = {
    "length": (int, "tokens per sequence / prompt (ppl: L, up to the model context)"),
    "segments": (int, "disjoint text segments (one batch row each)"),
    "prefill": (int, "tokens prefilled before streaming one decode step per token"),
    "topk": (int, "K of the true top-K attention set"),
    "queries": (str, "query positions as fractions of the length, comma-separated"),
    "depths": (str, "needle depths in [0, 1], comma-separated"),
    "trials": (int, "trials per (depth, budget, policy) cell"),
    "max_new_tokens": (int, "greedy tokens generated per prompt"),
    "chat_prompts": (int, "instruct prompts (chat template)"),
    "book_prompts": (int, "book continuation prompts"),
    "prompt_length": (int, "tokens per book continuation prompt"),
}
HELP = {
    "ppl": "streaming perplexity against cache budget",
    "recall": "recall/precision of the true top-K attention set in each policy's cache",
    "passkey": "pass-key retrieval accuracy by depth and budget",
    "agreement": "greedy output agreement with full attention (token match, ROUGE-L, BLEU)",
    "all": "all four evaluations into one results folder with a README.md",
}


def add_parsers(sub, func) -> None:
    """Add the `eval` command and its subcommands to argparse subparsers `sub`;
    each parsed namespace gets func as `func` and its kind as `eval_kind`."""
    e = sub.add_parser("eval", help="quality evaluations of the cache policies",
                       description="Quality evaluations; sizes from --size, overridden by any flag given.")
    esub = e.add_subparsers(dest="eval_kind", required=True)
    for kind in (*KINDS, "all"):
        p = esub.add_parser(kind, help=HELP[kind], description=HELP[kind])
        p.add_argument("--model", default=None, help="checkpoint dir, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
        p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
        p.add_argument("--adapter", default=None, help="a LoRA adapter folder merged into the model (adore "
                       "finetune-sparse), or 'packaged': the Stage-1 adapter shipped for the default model")
        p.add_argument("--size", choices=tuple(PRESETS), default="small", help="preset sizes (small: CPU minutes)")
        p.add_argument("--policy", action="append", help=f"policies, comma-separated or repeated (default {ALL_POLICIES}; adore-rN-sK: R = N, K sinks)")
        p.add_argument("--cache-size", action="append", help="budgets m, comma-separated or repeated")
        p.add_argument("--controller", default=None, help="adore: controller checkpoint folder")
        p.add_argument("--rebuild-every", type=int, default=1, help="adore: rebuild on every k-th step")
        p.add_argument("--batch-size", type=int, default=None, help="sequences per batch")
        p.add_argument("--chunk", type=int, default=None, help="prefill chunk length")
        p.add_argument("--text", default=None, help="the text: a UTF-8 file, or heldout (default: Persuasion), "
                       "valid (Northanger Abbey) or ood (out of domain: The Debian Administrator's Handbook)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--kv-dtype", choices=("auto", "bfloat16", "float32", "int8", "float8_e4m3"), default="auto",
                       help="cache slots (ppl only so far): auto (the weights' dtype), or int8 / float8_e4m3 with a "
                            "scale per slot and head")
        p.add_argument("--out", default="results", help="results folder (default: results); finished "
                       "rows are kept in OUT/.parts and reused when a stopped run is started again")
        names = ("length", "segments", "trials") if kind == "all" else tuple(PRESETS["small"][kind])
        for name in names:
            typ, text = OPTIONS[name]
            p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=text)
        p.set_defaults(func=func)


def settings(kind: str, args) -> dict:
    """The preset of args.size for `kind`, overridden by flags given (not None)."""
    preset = PRESETS[args.size]
    s = dict(preset[kind], batch_size=preset["batch_size"], chunk=preset["chunk"])
    for k in list(s):
        if getattr(args, k, None) is not None:
            s[k] = getattr(args, k)
    return s


def _run_one(kind: str, model, book, args, specs, budgets, meta) -> tuple[dict, dict]:
    """Run one evaluation; returns (result, written paths)."""
    from eval import agreement, passkey_eval, ppl, recall
    from eval.common import segments, split_values

    s = settings(kind, args)
    common = dict(controller=args.controller, rebuild_every=args.rebuild_every, batch_size=s["batch_size"],
                  chunk=s["chunk"], resume_dir=args.out, meta=dict(meta, text=book[1]) if kind != "passkey" else meta)
    p, cfg, tok = model.params, model.cfg, model.tokenizer
    if kind == "ppl":
        res = ppl.run_ppl(p, cfg, segments(book[0], s["length"], s["segments"]), specs, budgets, s["prefill"],
                          kv_dtype=args.kv_dtype, **common)
        return res, ppl.write_ppl(res, args.out)
    if kind == "recall":
        res = recall.run_recall(p, cfg, segments(book[0], s["length"], s["segments"]), specs, budgets, s["topk"],
                                split_values([s["queries"]], float), s["prefill"], **common)
        return res, recall.write_recall(res, args.out)
    if kind == "passkey":
        prompts = passkey_eval.passkey_prompts(tok, s["length"], split_values([s["depths"]], float), s["trials"], args.seed)
        res = passkey_eval.run_passkey(p, cfg, tok, prompts, specs, budgets, s["max_new_tokens"], **common)
        return res, passkey_eval.write_passkey(res, args.out)
    prompts = agreement.chat_prompts(tok, s["chat_prompts"]) + agreement.book_prompts(book[0], s["book_prompts"], s["prompt_length"])
    if not prompts:
        raise ValueError("agreement needs at least one prompt (--chat-prompts / --book-prompts)")
    res = agreement.run_agreement(p, cfg, tok, prompts, specs, budgets, s["max_new_tokens"], **common)
    return res, agreement.write_agreement(res, args.out)


def write_readme(out_dir, done: dict, meta: dict, command: str) -> Path:
    """README.md of a results folder: settings, each evaluation's tables inline, plots linked."""
    out = Path(out_dir)
    lines = ["# ADORE evaluation results", "", f"Command: `{command}`", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    for kind, (res, paths, sec) in done.items():
        lines += ["", f"## {HELP[kind][0].upper() + HELP[kind][1:]}", "", f"({sec:.0f} s in this call; seconds per row in [{kind}.json]({kind}.json))", ""]
        if res.get("controller"):
            lines += [f"ADORE controller: {res['controller']}.", ""]
        lines.append(Path(paths["md"]).read_text().strip())
        if "png" in paths:
            lines += ["", f"![{kind}]({kind}.png)"]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_from_args(args) -> int:
    """Entry point of `adore eval ...` (args from the parser of add_parsers)."""
    import jax

    from eval.common import book_text, encode, load_model, parse_budgets, parse_policies

    preset = PRESETS[args.size]
    specs = parse_policies(args.policy or [preset["policy"]])
    budgets = parse_budgets(args.cache_size or [preset["cache_size"]])
    if args.rebuild_every < 1:
        raise ValueError(f"rebuild-every must be >= 1, got {args.rebuild_every}")
    kinds = KINDS if args.eval_kind == "all" else (args.eval_kind,)
    if args.kv_dtype != "auto" and kinds != ("ppl",):
        raise ValueError(f"--kv-dtype {args.kv_dtype} is taken by `adore eval ppl` only so far")
    from adore_jax.engine import check_kv_dtype

    check_kv_dtype(args.kv_dtype)
    model = load_model(args.model, args.dtype, args.adapter)
    meta = dict(model=str(model.source), dtype=str(model.params.embed.dtype), device=str(jax.devices()[0]),
                date=datetime.date.today().isoformat())
    book = ("", "")
    if any(k != "passkey" for k in kinds):
        text, desc = book_text(args.text)
        book = (encode(model.tokenizer, text), desc)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    done = {}
    for kind in kinds:
        t0 = time.perf_counter()
        res, paths = _run_one(kind, model, book, args, specs, budgets, meta)
        done[kind] = (res, paths, time.perf_counter() - t0)
        print(Path(paths["md"]).read_text())
        if res.get("controller", "").startswith("random"):
            print("note: the adore policy used a randomly initialized controller (none trained yet)", file=sys.stderr)
        print(f"wrote {', '.join(str(v) for v in paths.values())}", file=sys.stderr)
    if args.eval_kind == "all":
        cmd = "adore " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["eval"] else "adore eval all"
        print(f"wrote {write_readme(args.out, done, meta, cmd)}", file=sys.stderr)
    return 0
