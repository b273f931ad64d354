"""The controller's training mix: book rows, chat rows and retrieval rows.

A mix string names each kind's share of the training tokens, e.g.
"books=0.7,chat=0.15,retrieval=0.15" (DEFAULT_MIX), optionally with
"seed=N" (default 0) to draw other synthetic rows. Shares are >= 0 and sum to
1; a kind left out has share 0. Every row is seq_len tokens, so shares of rows
are shares of tokens.

`build_mix` writes a complete packed folder, PACKED/mix-KEY/: train.npy (the
mixed rows, shuffled), train_kinds.npy (each row's kind), valid/heldout/ood.npy
(the books' own, copied) and packed_manifest.json with the composition under
"mix". Chat and retrieval rows are made from the training split only.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from train import data, synthetic

KINDS = ("books", "chat", "retrieval")
DEFAULT_MIX = "books=0.7,chat=0.15,retrieval=0.15"
MIX_VERSION = 1  # bump when the synthetic rows change: older mix folders are then rebuilt


def parse_mix(spec: str) -> tuple[dict[str, float], int]:
    """("books=0.7,chat=0.15,retrieval=0.15[,seed=N]") -> ({kind: share}, seed).

    Raises ValueError (one line) for an unknown or repeated name, a value that
    is not a number, a negative share, or shares that do not sum to 1.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty mix: expected e.g. {DEFAULT_MIX}")
    shares, seed, seen = dict.fromkeys(KINDS, 0.0), 0, set()
    for part in spec.split(","):
        name, eq, value = (x.strip() for x in part.partition("="))
        if not eq or not name or not value:
            raise ValueError(f"bad mix item {part.strip()!r}: expected NAME=VALUE as in {DEFAULT_MIX}")
        if name not in KINDS and name != "seed":
            raise ValueError(f"unknown mix name {name!r}: expected {', '.join(KINDS)} or seed")
        if name in seen:
            raise ValueError(f"{name!r} given twice in mix {spec!r}")
        seen.add(name)
        if name == "seed":
            if not re.fullmatch(r"\d+", value):
                raise ValueError(f"mix seed must be a non-negative integer, got {value!r}")
            seed = int(value)
            continue
        try:
            share = float(value)
        except ValueError:
            raise ValueError(f"mix share {name}={value!r} is not a number") from None
        if not np.isfinite(share) or share < 0:
            raise ValueError(f"mix share {name}={value} must be a finite number >= 0")
        shares[name] = share
    if abs(sum(shares.values()) - 1.0) > 1e-6:
        raise ValueError(f"mix shares must sum to 1, got {sum(shares.values()):g} in {spec!r}")
    return shares, seed


def mix_key(shares: dict[str, float], seed: int) -> str:
    """The canonical name of a mix, e.g. "books0.7_chat0.15_retrieval0.15_seed0"."""
    return "_".join(f"{k}{shares[k]:g}" for k in KINDS if shares[k] > 0) + f"_seed{seed}"


def mix_rows(shares: dict[str, float], book_rows: int, rows: int | None = None) -> dict[str, int]:
    """Rows of each kind: every book row when books have a share and rows is
    None (the others in proportion to them), else `rows` in all (default
    book_rows) split by the shares."""
    if rows is None and shares["books"] > 0:
        return {"books": book_rows, **{k: round(book_rows * shares[k] / shares["books"]) for k in KINDS[1:]}}
    rows = book_rows if rows is None else rows
    counts = {k: round(rows * shares[k]) for k in KINDS[1:]}
    counts = {"books": rows - sum(counts.values()), **counts}
    if counts["books"] > book_rows:
        raise ValueError(f"the mix needs {counts['books']} book rows, only {book_rows} exist")
    return counts


def build_mix(packed_dir, raw_dir, tokenizer, mix: str = DEFAULT_MIX, rows: int | None = None) -> Path:
    """Build packed_dir/mix-KEY/ (see the module docstring) and return it.

    packed_dir: pack_corpora's output (its train.npy are the book rows);
    raw_dir: the fetch_corpora folder whose training split feeds the chat and
    retrieval rows; rows: total rows (default: every book row plus the others
    in proportion). train.npy is [rows, seq_len] int32.
    """
    packed_dir = Path(packed_dir)
    shares, seed = parse_mix(mix)
    parent = data._read_manifest(packed_dir / "packed_manifest.json")
    if not parent:
        raise data.DataError(f"no packed corpora in {packed_dir}: run pack_corpora first")
    seq_len, eos_id = parent["seq_len"], parent["eos_id"]
    books = data.load_packed(packed_dir, "train")
    counts = mix_rows(shares, len(books), rows)
    train_texts = [(w["title"], w.get("author", ""), text) for w, text in data.read_corpora(raw_dir, "train")]
    library = synthetic.Library.from_texts(train_texts) if counts["chat"] + counts["retrieval"] else None

    rng = np.random.default_rng([seed, 0])
    parts, extra = [np.asarray(books[np.sort(rng.permutation(len(books))[: counts["books"]])])], {}
    if counts["chat"]:
        chat, extra["conversations"] = synthetic.chat_rows(library, tokenizer, seq_len, counts["chat"], seed, eos_id)
        parts.append(chat)
    if counts["retrieval"]:
        parts.append(synthetic.retrieval_rows(library, tokenizer, seq_len, counts["retrieval"], seed))
    kinds = np.repeat(np.arange(len(KINDS), dtype=np.int8), [counts[k] for k in KINDS])
    order = rng.permutation(len(kinds))
    train = np.concatenate(parts).astype(np.int32)[order]

    key = mix_key(shares, seed)
    out = packed_dir / f"mix-{key}"
    files = {out / "train.npy": train, out / "train_kinds.npy": kinds[order]}
    splits = {"train": {"file": "train.npy", "sequences": len(train), "tokens": int(train.size), "dropped_tokens": 0,
                        "sources": parent["splits"]["train"]["sources"] + [k for k in KINDS[1:] if counts[k]]}}
    for split, info in parent["splits"].items():
        if split != "train":
            files[out / info["file"]] = np.asarray(data.load_packed(packed_dir, split))
            splits[split] = info
    manifest = dict(parent, splits=splits, mix={
        "version": MIX_VERSION, "spec": mix, "key": key, "seed": seed, "shares": shares,
        "kinds_file": "train_kinds.npy", "kind_ids": {k: i for i, k in enumerate(KINDS)},
        "book_rows_available": len(books),
        "composition": {k: {"rows": counts[k], "tokens": counts[k] * seq_len,
                            "share": counts[k] / max(len(train), 1)} for k in KINDS},
        **extra,
    })
    manifest_path = out / "packed_manifest.json"
    if manifest_path.exists():
        manifest_path.unlink()
    data._commit(files)
    data._commit({manifest_path: data._json_bytes(manifest)})
    return out


def load_or_build_mix(packed_dir, tokenizer, mix: str, raw_dir=None) -> Path:
    """packed_dir/mix-KEY/ for this mix, built on first use (raw_dir: the
    corpora folder, default the project cache, fetched when missing)."""
    shares, seed = parse_mix(mix)
    out = Path(packed_dir) / f"mix-{mix_key(shares, seed)}"
    manifest = data._read_manifest(out / "packed_manifest.json")
    parent = data._read_manifest(Path(packed_dir) / "packed_manifest.json")
    if manifest and parent and manifest.get("mix", {}).get("version") == MIX_VERSION and \
            all(manifest.get(k) == parent.get(k) for k in ("version", "seq_len", "tokenizer", "corpora_sources")):
        return out
    if raw_dir is None:
        raw_dir = data.default_cache_dir()
        data.fetch_corpora(raw_dir)
    return build_mix(packed_dir, raw_dir, tokenizer, mix)
