"""The `adore` command line: generate, fetch-model, info, eval.

User mistakes (bad paths, bad values, prompts too long) end with a one-line
`adore: error: ...` on stderr and exit status 2; running out of device memory,
with one line and a hint, and exit status 1. Set ADORE_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from adore_jax.policies import POLICIES

DTYPES = ("auto", "float32", "bfloat16")
KV_DTYPE_NAMES = ("auto", "bfloat16", "float32", "int8", "float8_e4m3")  # models.cache.KV_DTYPES and "auto"


def _load(args, mesh=None):
    from adore_jax.hub import resolve_adapter, resolve_model
    from models.loading import load_model, resolve_dtype

    return load_model(resolve_model(args.model), dtype=resolve_dtype(args.dtype), mesh=mesh,
                      adapter=resolve_adapter(args.adapter))


def _mesh(args, batch: int):
    """The generation mesh of --mesh; without it, every local device on the data
    axis when they divide the batch, else None (one device)."""
    from adore_jax.sharding import default_mesh, make_mesh

    return make_mesh(args.mesh) if args.mesh else default_mesh(batch)


def _policy(args, cfg):
    """(policy, policy params) from --policy/--cache-size/... ."""
    from adore_jax.policies import build_policy

    pol, pp, note = build_policy(
        args.policy, cfg, args.cache_size, controller=args.controller, sinks=args.sinks, recent=args.recent,
        rebuild=args.rebuild, rebuild_every=args.rebuild_every,
    )
    if note:
        print(f"adore: using a {note}" if note.startswith("random") else f"adore: using {note}", file=sys.stderr)
    return pol, pp


def _encode_prompt(tok, prompt: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tok, "chat_template", None):
            raise ValueError("--chat needs a model whose tokenizer has a chat template")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tok(prompt)["input_ids"]


def cmd_generate(args) -> int:
    """`adore generate`: stream a completion of --prompt to stdout (summary on stderr); exit status."""
    from adore_jax import engine
    from adore_jax.sampling import SamplingParams

    sp = SamplingParams(args.temperature, args.top_k, args.top_p).validate()
    if args.prompt == "-":
        args.prompt = sys.stdin.read()
    mesh = _mesh(args, 1)
    model = _load(args, mesh)
    policy, pp = _policy(args, model.cfg)
    ids = _encode_prompt(model.tokenizer, args.prompt, args.chat)
    ec = engine.plan([len(ids)], args.max_new_tokens, model.cfg.max_position_embeddings, policy=policy, mesh=mesh,
                     kv_dtype=args.kv_dtype)
    engine.check_mesh(ec, model.cfg, 1)  # validate first
    eos = set(model.cfg.eos_token_ids)
    chunks = engine.stream(
        model.params, model.cfg, [ids], args.max_new_tokens, sp, seed=args.seed, policy=policy, policy_params=pp,
        mesh=mesh, kv_dtype=args.kv_dtype,
    )
    out: list[int] = []
    shown = ""
    stamps = [time.perf_counter()]  # after each chunk: [start, prefill, compile + chunk, chunk, ...]
    counts = []  # tokens per chunk
    for chunk in chunks:
        stamps.append(time.perf_counter())
        counts.append(chunk.shape[1])
        for t in chunk[0].tolist():
            if out and out[-1] in eos:
                break
            out.append(int(t))
        text = model.tokenizer.decode([t for t in out if t not in eos], skip_special_tokens=True)
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")
    steady = len(stamps) > 3  # decode rate over the chunks after the first (compiling) one
    rate = sum(counts[2:]) / (stamps[-1] - stamps[2]) if steady else float("nan")
    print(
        f"[{len(out)} tokens | prompt {len(ids)} tokens | first token {stamps[1] - stamps[0]:.2f} s with compile | "
        f"decode {rate:.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


def cmd_fetch_model(args) -> int:
    """`adore fetch-model`: download the default model into the cache and print its path."""
    from adore_jax.hub import fetch_default_model

    path = fetch_default_model(progress=True)
    print(path)
    return 0


def cmd_info(args) -> int:
    """`adore info`: the model's config, the cache's bytes for a policy and length, the devices."""
    import jax

    from adore_jax.engine import check_kv_dtype
    from models.cache import kv_dtype, slot_bytes

    check_kv_dtype(args.kv_dtype)
    model = _load(args)
    cfg = model.cfg
    itemsize = model.params.embed.dtype.itemsize
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(model.params))
    print(f"model: {model.source}")
    for k, v in vars(cfg).items():
        print(f"  {k}: {v}")
    print(f"parameters: {n_params / 1e6:.1f} M ({n_params * itemsize / 2**20:.1f} MiB)")
    policy, _ = _policy(args, cfg)
    dtype = kv_dtype(args.kv_dtype, model.params.embed.dtype)
    per_tok = slot_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
    full = per_tok * args.max_len
    slots = policy.num_slots(args.max_len)
    print(f"KV cache per sequence at {args.max_len} tokens ({per_tok} bytes per slot, {dtype.name} slots: "
          "K and V, with their scales when 8-bit):")
    print(f"  full attention: {full / 2**20:.2f} MiB")
    if args.policy != "full":
        print(f"  {args.policy} (m = {slots} slots): {per_tok * slots / 2**20:.2f} MiB "
              f"({full / (per_tok * slots):.1f}x smaller)")
    print(f"devices: {', '.join(str(d) for d in jax.devices())}")
    return 0


# Subcommands whose own entry point parses the rest of the command line.
DELEGATED = {
    "train-controller": "train.controller",
    "finetune-sparse": "train.finetune",
    "data": "train.data_cli",
    "bench": "eval.throughput",
}


def cmd_eval(args) -> int:
    """`adore eval KIND`: run a quality evaluation (eval.runner)."""
    from eval.runner import run_from_args

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    """The `adore` argument parser with its subcommands (the delegated ones excepted)."""
    p = argparse.ArgumentParser(prog="adore", description="ADORE sparse-attention decoding in JAX")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("--model", default=None, help="checkpoint dir, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
        sp.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on GPU/TPU, float32 on CPU")
        sp.add_argument("--adapter", default=None, help="a LoRA adapter folder merged into the model (adore finetune-sparse), "
                        "or 'packaged': the Stage-1 adapter shipped for the default model")
        sp.add_argument("--policy", choices=POLICIES, default="full", help="KV cache policy (default: full)")
        sp.add_argument("--cache-size", type=int, default=None, help="cache slots m (required unless --policy full)")
        sp.add_argument("--rebuild", type=int, default=0, help="adore: rebuilt tokens R per step")
        sp.add_argument("--rebuild-every", type=int, default=1, help="adore: rebuild on every k-th step")
        sp.add_argument("--sinks", type=int, default=None, help="always-kept first tokens (streaming and adore: 4)")
        sp.add_argument("--recent", type=int, default=None, help="always-kept most recent tokens (h2o: m/2)")
        sp.add_argument("--controller", default=None, help="adore: controller checkpoint folder (default: packaged)")
        sp.add_argument("--kv-dtype", choices=KV_DTYPE_NAMES, default="auto",
                        help="cache slots: auto (the weights' dtype), or int8 / float8_e4m3 with a scale per slot "
                             "and head (float8_e4m3: GPUs of compute capability >= 8.9)")

    g = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout")
    g.add_argument("--prompt", required=True, help="prompt text ('-' reads standard input)")
    model_args(g)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--mesh", default=None, help="devices as data=D,model=M: sequences split over D, heads over M "
                   "(docs/SERVING.md); default: every local device on data when they divide the batch, else one")
    g.set_defaults(func=cmd_generate)

    f = sub.add_parser("fetch-model", help="download the default model into the user cache")
    f.set_defaults(func=cmd_fetch_model)

    for name in DELEGATED:  # listed for --help; main() hands their arguments over unparsed
        sub.add_parser(name, help=f"see `adore {name} --help`", add_help=False)

    i = sub.add_parser("info", help="model config, cache size, devices")
    model_args(i)
    i.add_argument("--max-len", type=int, default=4096, help="sequence length for the cache-size figure")
    i.set_defaults(func=cmd_info)

    from eval.runner import add_parsers  # eval {ppl,recall,passkey,agreement,all}

    add_parsers(sub, cmd_eval)
    return p


OOM_HINT = ("use a smaller batch, --cache-size or prompt; on a GPU JAX holds 75% of its memory by default "
            "(XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 gives it more)")


def run_main(fn, *args) -> int:
    """Run fn(*args); user mistakes become one line on stderr and exit status 2,
    running out of device memory one line with a hint and exit status 1."""
    try:
        return fn(*args)
    except (ValueError, OSError) as e:
        if os.environ.get("ADORE_DEBUG"):
            raise
        print(f"adore: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # jax.errors.JaxRuntimeError, without importing jax here
        if "RESOURCE_EXHAUSTED" not in str(e) or os.environ.get("ADORE_DEBUG"):
            raise
        print(f"adore: error: out of device memory ({str(e).splitlines()[0][:160]}); {OOM_HINT}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("adore: interrupted", file=sys.stderr)
        return 130


def main(argv=None) -> int:
    """The `adore` entry point: dispatch argv to a subcommand or a delegated job's main; exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        return run_main(importlib.import_module(DELEGATED[argv[0]]).main, argv[1:])
    args = build_parser().parse_args(argv)
    return run_main(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
