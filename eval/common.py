"""Shared pieces of the quality evaluations: policy specs, text, tables, plots.

A policy spec is a label on the command line: one of adore_jax.policies.POLICIES,
or `adore-rN-sK-wP` for ADORE with N rebuilt tokens per step, K protected sink
tokens and the most recent P% of the m slots protected (each part optional;
`adore` alone takes the policy's defaults, with R = 0).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from adore_jax.policies import POLICIES

HELDOUT_BOOK = "persuasion"


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """A policy as named on the command line: its label, policy name and ADORE settings."""

    label: str  # as written in tables and plots
    name: str  # adore_jax.policies name
    rebuild: int = 0  # adore: R rebuilt tokens per step
    sinks: Optional[int] = None  # adore: protected first tokens (None: the policy default)
    recent_pct: Optional[int] = None  # adore: protected recent tokens, % of m (None: the policy default)
    queries: int = 1  # adore: a prefill chunk's last queries that score its cut (AdorePolicy.prefill_queries)


def split_values(values: Optional[Iterable[str]], cast=str) -> list:
    """Flatten repeated and comma-separated values ("a,b" "c" -> [a, b, c]), cast each."""
    out = []
    for v in values or ():
        for part in str(v).split(","):
            if part.strip():
                try:
                    out.append(cast(part.strip()))
                except ValueError:
                    raise ValueError(f"bad value {part.strip()!r}") from None
    return out


def parse_policy(label: str) -> PolicySpec:
    """A PolicySpec from `full`, `window`, ..., `adore`, or `adore-rN-sK-wP-qQ` with any
    of its parts (N rebuilt tokens per step, K sink tokens, P% of m recent tokens, Q
    queries of a prefill chunk scoring its cut)."""
    if label in POLICIES:
        return PolicySpec(label, label, 0)
    m = re.fullmatch(r"adore(?:-r(\d+))?(?:-s(\d+))?(?:-w(\d+))?(?:-q(\d+))?", label)
    if m and (m.group(3) is None or int(m.group(3)) < 100) and (m.group(4) is None or int(m.group(4)) >= 1):
        r = int(m.group(1) or 0)
        k, w = (None if g is None else int(g) for g in m.group(2, 3))
        q = int(m.group(4) or 1)
        return PolicySpec(label if (r, k, w, q) != (0, None, None, 1) else "adore", "adore", r, k, w, q)
    raise ValueError(f"unknown policy {label!r}; choose from {', '.join(POLICIES)}, or adore-rN-sK-wP-qQ (N rebuilt "
                     "tokens, K sink tokens, P < 100 percent of m recent tokens, Q >= 1 queries scoring a prefill "
                     "chunk's cut; each part optional)")


def parse_policies(values: Iterable[str]) -> list[PolicySpec]:
    """Specs from repeated/comma-separated labels, duplicates dropped, order kept."""
    specs = [parse_policy(v) for v in split_values(values)]
    if not specs:
        raise ValueError("give at least one policy")
    return list({s.label: s for s in specs}.values())


def parse_budgets(values: Iterable) -> list[int]:
    """Sorted distinct cache sizes m (slots) from repeated/comma-separated values."""
    budgets = sorted(set(split_values(values, int)))
    if not budgets or budgets[0] < 1:
        raise ValueError(f"cache sizes must be integers >= 1, got {budgets or 'none'}")
    return budgets


@functools.lru_cache(maxsize=8)
def _controller(cfg, path):
    from adore_jax.controller import default_controller

    return default_controller(cfg, path)  # loaded once per (backbone, checkpoint)


def build(spec: PolicySpec, cfg, budget: int, controller=None, rebuild_every: int = 1):
    """(policy, policy params, note) for a spec at cache size `budget` (slots); like
    adore_jax.policies.build_policy, loading the adore controller once per process."""
    from adore_jax.policies import build_policy, make_policy

    if spec.name != "adore":
        return build_policy(spec.name, cfg, None if spec.name == "full" else budget)
    from flax import nnx

    gd, state, note = _controller(cfg, None if controller is None else str(controller))
    recent = None if spec.recent_pct is None else spec.recent_pct * budget // 100
    policy = make_policy("adore", budget, rebuild=spec.rebuild, rebuild_every=rebuild_every, sinks=spec.sinks, recent=recent,
                         controller_graphdef=gd, feature_layer=nnx.merge(gd, state).feature_layer,
                         prefill_queries=spec.queries)
    return policy, state, note


def controller_note(specs: Sequence[PolicySpec], cfg, controller=None) -> str:
    """Which ADORE controller the run uses ('' when no adore policy is in specs)."""
    if not any(s.name == "adore" for s in specs):
        return ""
    return _controller(cfg, None if controller is None else str(controller))[2]


def controller_fingerprint(cfg, controller=None) -> str:
    """A short hash of the ADORE controller's weights. Part of every run's key, with
    or without an adore policy, so runs of different policy lists (e.g. split over
    devices) share one results folder."""
    import hashlib

    import jax

    h = hashlib.sha1()
    for leaf in jax.tree_util.tree_leaves(_controller(cfg, None if controller is None else str(controller))[1]):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()[:16]


def load_model(path=None, dtype: str = "auto", adapter=None):
    """models.loading.Model from a path/hub id (None: the default SmolLM2), with a LoRA
    adapter merged in if given (a folder, or "packaged": adore_jax.hub.resolve_adapter).
    dtype: auto (bfloat16 on accelerators, float32 on CPU), float32 or bfloat16."""
    import jax
    import jax.numpy as jnp

    from adore_jax.hub import resolve_adapter, resolve_model
    from models.loading import load_model as _load

    if dtype == "auto":
        dt = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    elif dtype in ("float32", "bfloat16"):
        dt = jnp.dtype(dtype)
    else:
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {dtype!r}")
    return _load(resolve_model(path), dtype=dt, adapter=resolve_adapter(adapter))


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text, without special tokens."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


def chat_ids(tokenizer, text: str) -> list[int]:
    """The user message wrapped in the tokenizer's chat template (plain text without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return encode(tokenizer, text)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


TEXTS = {"heldout": "held-out book", "valid": "validation book", "ood": "out-of-domain text"}  # corpora splits


def book_text(text_file=None) -> tuple[str, str]:
    """(text, description): the held-out book (Persuasion) when text_file is
    None or "heldout"; "valid" (Northanger Abbey) or "ood" (The Debian
    Administrator's Handbook) for those corpora splits, fetched into the
    project cache on first use; else a user text file (write ./ood for a file named ood)."""
    if text_file is not None and text_file not in TEXTS:
        p = Path(text_file)
        if not p.is_file():
            raise ValueError(f"no such text file: {p} (or name one of {', '.join(TEXTS)})")
        return p.read_text(encoding="utf-8", errors="replace"), str(p)
    from train.data import default_cache_dir, fetch_corpora

    root = default_cache_dir()
    manifest = fetch_corpora(root)
    split = text_file or "heldout"
    work = next(w for w in manifest["works"] if w["split"] == split and (split != "heldout" or w["name"] == HELDOUT_BOOK))
    return (root / work["file"]).read_text(encoding="utf-8"), f"{work['title']} ({TEXTS[split]})"


def segments(ids: Sequence[int], length: int, count: int) -> np.ndarray:
    """[n, length] int32: up to `count` disjoint consecutive windows of ids (n >= 1)."""
    if length < 2:
        raise ValueError(f"length must be >= 2, got {length}")
    n = min(count, len(ids) // length)
    if n < 1:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one segment of {length}")
    return np.asarray(ids[: n * length], np.int32).reshape(n, length)


def batches(n: int, size: int) -> list[slice]:
    """Slices covering range(n) in pieces of at most `size`."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def write_json(path, obj) -> Path:
    """Write obj as indented JSON (NaN written as null); returns the path."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, np.generic):
            return clean(x.item())
        return x

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(obj), indent=2) + "\n")
    return path


def write_outputs(out_dir, kind: str, res: dict, md: str, plot=None) -> dict:
    """Write KIND.json (res), KIND.md (md) and, given plot(res, path), KIND.png into
    out_dir; returns {"json"|"md"|"png": path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = dict(json=write_json(out / f"{kind}.json", res), md=out / f"{kind}.md")
    paths["md"].write_text(md)
    if plot is not None:
        paths["png"] = out / f"{kind}.png"
        plot(res, paths["png"])
    return paths


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table (floats with 4 significant digits)."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def new_figure(width: float = 6.4, height: float = 4.2, ncols: int = 1):
    """(figure, axes: one or a list of ncols) drawn by the Agg backend, without
    touching pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, (axes[0] if ncols == 1 else list(axes))


class RowCache:
    """Finished rows of a run, one JSON file each under ROOT/.parts/KIND/, keyed by a
    hash of the run's settings and data: a run stopped midway (a time limit, a lost
    machine) resumes where it stopped when started again with the same settings.
    ROOT None: a no-op."""

    def __init__(self, root, kind: str, settings: dict):
        import hashlib

        blob = json.dumps(settings, sort_keys=True, default=str).encode()
        self.dir = None if root is None else Path(root) / ".parts" / kind / hashlib.sha1(blob).hexdigest()[:16]

    def _path(self, label: str, budget) -> Optional[Path]:
        return None if self.dir is None else self.dir / f"{label}_m{budget or 'all'}.json"

    def get(self, label: str, budget):
        """The stored value of (policy label, budget), or None."""
        p = self._path(label, budget)
        return json.loads(p.read_text()) if p is not None and p.is_file() else None

    def put(self, label: str, budget, value) -> None:
        """Store a JSON-able value for (policy label, budget) (written atomically)."""
        p = self._path(label, budget)
        if p is not None:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".tmp")
            tmp.write_text(json.dumps(value))
            tmp.replace(p)


def run_key(meta: Optional[dict], **settings) -> dict:
    """The settings that identify a run's results: model, dtype and device from meta,
    plus the given settings."""
    return dict({k: (meta or {}).get(k) for k in ("model", "dtype", "device")}, **settings)


def fingerprint(*arrays) -> str:
    """A short hash of token arrays / id lists (part of a RowCache key)."""
    import hashlib

    h = hashlib.sha1()
    for a in arrays:
        h.update(np.asarray(a, np.int64).tobytes())
    return h.hexdigest()[:16]
