"""The `adore` command line: generate, fetch-model, info.

User mistakes (bad paths, bad values, prompts too long) end with a one-line
`adore: error: ...` on stderr and exit status 2; set ADORE_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DTYPES = ("auto", "float32", "bfloat16")


def _dtype(name: str):
    import jax
    import jax.numpy as jnp

    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def _load(args):
    from adore_jax.hub import resolve_model
    from models.loading import load_model

    return load_model(resolve_model(args.model), dtype=_dtype(args.dtype))


def _encode_prompt(tok, prompt: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tok, "chat_template", None):
            raise ValueError("--chat needs a model whose tokenizer has a chat template")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tok(prompt)["input_ids"]


def cmd_generate(args) -> int:
    from adore_jax import engine
    from adore_jax.sampling import SamplingParams

    sp = SamplingParams(args.temperature, args.top_k, args.top_p).validate()
    if args.prompt == "-":
        args.prompt = sys.stdin.read()
    model = _load(args)
    ids = _encode_prompt(model.tokenizer, args.prompt, args.chat)
    engine.plan([len(ids)], args.max_new_tokens, model.cfg.max_position_embeddings)  # validate before compiling
    eos = set(model.cfg.eos_token_ids)
    out: list[int] = []
    shown = ""
    t0 = time.perf_counter()
    t_first = None
    for chunk in engine.stream(model.params, model.cfg, [ids], args.max_new_tokens, sp, seed=args.seed):
        t_first = t_first or time.perf_counter()
        for t in chunk[0].tolist():
            if out and out[-1] in eos:
                break
            out.append(int(t))
        text = model.tokenizer.decode([t for t in out if t not in eos], skip_special_tokens=True)
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    t_end = time.perf_counter()
    sys.stdout.write("\n")
    n = len(out)
    rate = (n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else float("nan")
    print(
        f"[{n} tokens | prompt {len(ids)} tokens | first token {t_first - t0:.2f} s (with compile) | "
        f"{rate:.1f} tokens/s after]",
        file=sys.stderr,
    )
    return 0


def cmd_fetch_model(args) -> int:
    from adore_jax.hub import fetch_default_model

    path = fetch_default_model(progress=True)
    print(path)
    return 0


def cmd_info(args) -> int:
    import jax

    model = _load(args)
    cfg = model.cfg
    itemsize = jax.numpy.dtype(_dtype(args.dtype)).itemsize
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(model.params))
    print(f"model: {model.source}")
    for k, v in vars(cfg).items():
        print(f"  {k}: {v}")
    print(f"parameters: {n_params / 1e6:.1f} M ({n_params * itemsize / 2**20:.1f} MiB)")
    per_tok = cfg.kv_bytes_per_token * itemsize
    print(f"KV cache: {per_tok} bytes per token; full attention at {args.max_len} tokens: "
          f"{per_tok * args.max_len / 2**20:.1f} MiB per sequence")
    print(f"devices: {', '.join(str(d) for d in jax.devices())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adore", description="ADORE sparse-attention decoding in JAX")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("--model", default=None, help="checkpoint dir, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
        sp.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on GPU/TPU, float32 on CPU")

    g = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout")
    g.add_argument("--prompt", required=True, help="prompt text ('-' reads standard input)")
    model_args(g)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.set_defaults(func=cmd_generate)

    f = sub.add_parser("fetch-model", help="download the default model into the user cache")
    f.set_defaults(func=cmd_fetch_model)

    i = sub.add_parser("info", help="model config, cache size, devices")
    model_args(i)
    i.add_argument("--max-len", type=int, default=4096, help="sequence length for the cache-size figure")
    i.set_defaults(func=cmd_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        if os.environ.get("ADORE_DEBUG"):
            raise
        print(f"adore: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adore: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
