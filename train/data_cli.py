"""`adore data fetch`: download, clean, tokenize and pack the corpora, and build a training mix."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from train.data import PACKED_VERSION, _read_manifest, default_cache_dir, fetch_corpora, load_or_build_packed, pack_corpora
from train.mix import DEFAULT_MIX, parse_mix


def main(argv=None) -> int:
    """`adore data`: fetch and pack the training and evaluation corpora; exit status."""
    p = argparse.ArgumentParser(prog="adore data", description="training and evaluation corpora")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="fetch Austen, Shakespeare and the out-of-domain handbook; pack them for a "
                                     "model's tokenizer; optionally build a training mix")
    f.add_argument("--model", default=None, help="model whose tokenizer packs the text (default: SmolLM2)")
    f.add_argument("--seq-len", type=int, default=1024, help="tokens per packed sequence")
    f.add_argument("--mix", nargs="?", const=DEFAULT_MIX, default=None,
                   help=f"also build a training mix: shares of tokens as NAME=SHARE,... over books, chat and "
                        f"retrieval, summing to 1, optionally seed=N (--mix alone: {DEFAULT_MIX})")
    f.add_argument("--out", default=None, help="pack into this folder (default: a folder in the cache)")
    f.add_argument("--raw-only", action="store_true", help="fetch and clean the texts, do not pack")
    args = p.parse_args(argv)
    if args.mix is not None:
        try:
            parse_mix(args.mix)
        except ValueError as e:
            p.error(str(e))
    if args.seq_len < 1:
        p.error("--seq-len must be positive")
    manifest = fetch_corpora(default_cache_dir())
    splits = {}
    for w in manifest["works"]:
        splits[w["split"]] = splits.get(w["split"], 0) + 1
    print(f"{len(manifest['works'])} texts in {default_cache_dir()}: "
          + ", ".join(f"{n} {s}" for s, n in splits.items()))
    if args.raw_only:
        return 0
    from adore_jax.hub import resolve_model
    from models.loading import load_tokenizer

    tokenizer = load_tokenizer(resolve_model(args.model))
    if args.out:
        old = _read_manifest(Path(args.out) / "packed_manifest.json")
        if not (old and old.get("seq_len") == args.seq_len and old.get("version") == PACKED_VERSION):
            pack_corpora(default_cache_dir(), tokenizer, args.seq_len, args.out)
    path = load_or_build_packed(args.out, tokenizer, args.seq_len, mix=args.mix)
    packed = json.loads((path / "packed_manifest.json").read_text())
    print(json.dumps({s: {k: v[k] for k in ("sequences", "tokens")} for s, v in packed["splits"].items()}, indent=1))
    if "mix" in packed:
        print(json.dumps(packed["mix"]["composition"], indent=1))
    print(path)
    return 0
