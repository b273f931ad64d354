"""`adore data fetch`: download, clean, tokenize and pack the corpora."""

from __future__ import annotations

import argparse
import json

from train.data import default_cache_dir, fetch_corpora, load_or_build_packed


def main(argv=None) -> int:
    """`adore data`: fetch and pack the training and evaluation corpora; exit status."""
    p = argparse.ArgumentParser(prog="adore data", description="training and evaluation corpora")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="fetch Austen + Shakespeare; pack them for a model's tokenizer")
    f.add_argument("--model", default=None, help="model whose tokenizer packs the text (default: SmolLM2)")
    f.add_argument("--seq-len", type=int, default=1024, help="tokens per packed sequence")
    f.add_argument("--raw-only", action="store_true", help="fetch and clean the texts, do not pack")
    args = p.parse_args(argv)
    manifest = fetch_corpora(default_cache_dir())
    print(f"{len(manifest['works'])} texts in {default_cache_dir()}")
    if not args.raw_only:
        from adore_jax.hub import resolve_model
        from models.loading import load_tokenizer

        path = load_or_build_packed(None, load_tokenizer(resolve_model(args.model)), args.seq_len)
        print(json.dumps(json.loads((path / "packed_manifest.json").read_text())["splits"], indent=1))
        print(path)
    return 0
