"""The controller ablation: each lever of the training recipe on and off, in one run.

    python -m train.variants --steps 400 --seq-len 2048 --out results/ablation

Levers (LEVERS): labels from the future, on-policy pair weights, the hidden-state
input, protected sinks and recent positions, the chat + retrieval data mix.
Variants: `all` (every lever on), `no-LEVER` (that one off), `none` (all off),
plus two references that train nothing: `shipped` (the packaged controller) and
`baselines` (full attention, StreamingLLM, window). Each variant trains in its
own process, all at once (their GRU scans are latency-bound, so several share
one accelerator), with the same seed, data order and steps; then it is scored
on the validation book (Northanger Abbey) at --eval-len tokens: perplexity under
its own release schedule at each budget m and each protection setting
(adore_jax.schedule: one parallel pass; exact for embedding input, for a
hidden-state input the features come from full attention). A variant whose
result.json exists is skipped, and training resumes from its checkpoints, so a
stopped run continues when started again. Writes OUT/ablation.json, .md, .png.
The tables reported as results come from the decode loop (`adore eval`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

LEVERS = {  # name: (TrainConfig fields when on, when off); "budget/4" is a quarter of the training budget
    "future": (dict(horizon=128), dict(horizon=1)),
    "on-policy": (dict(on_policy=0.5), dict(on_policy=0.0)),
    "hidden": (dict(feature="hidden:8"), dict(feature="embedding")),
    "protect": (dict(sinks=4, recent="budget/4"), dict(sinks=0, recent=0)),
    "mix": (dict(mix="books=0.7,chat=0.15,retrieval=0.15"), dict(mix="")),
}
REFERENCES = ("shipped", "baselines")


def variants() -> dict[str, dict]:
    """name -> TrainConfig overrides for every trained variant."""
    on = {k: v[0] for k, v in LEVERS.items()}
    out = {"all": {}}
    for lever in LEVERS:
        out[f"no-{lever}"] = {lever: False}
    out["none"] = {lever: False for lever in LEVERS}
    return {name: _fields({lever: (lever not in off) for lever in on}) for name, off in out.items()}


def _fields(levers: dict[str, bool]) -> dict:
    fields = {}
    for lever, state in levers.items():
        fields.update(LEVERS[lever][0 if state else 1])
    return fields


def train_config(name: str, args):
    """The TrainConfig of variant `name` under the run's common settings."""
    from train.controller import TrainConfig

    fields = variants()[name]
    base = TrainConfig(seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, eval_batches=args.eval_batches,
                       eval_every=10**6, save_every=50, num_buckets=args.num_buckets, out=str(Path(args.out) / name))
    if fields.get("recent") == "budget/4":
        fields = dict(fields, recent=base.cache_size // 4)
    return dataclasses.replace(base, **fields).validate()


def validation_tokens(tokenizer, length: int, count: int) -> np.ndarray:
    """[n, length] int32: up to `count` consecutive segments of the validation book."""
    from train.data import default_cache_dir, fetch_corpora, read_corpora

    fetch_corpora(default_cache_dir())
    ids = []
    for _, text in read_corpora(default_cache_dir(), "valid"):
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
    n = min(count, len(ids) // length)
    if n < 1:
        raise ValueError(f"the validation book has {len(ids)} tokens, fewer than one segment of {length}")
    return np.asarray(ids[: n * length], np.int32).reshape(n, length)


def schedule_scores(params, cfg, tokens: np.ndarray, budgets, policies) -> dict:
    """{label: {m: perplexity}} of tokens [N, L] (one segment a pass) for policies(m) ->
    [(label, policy, policy params, controller feature or None)] under their release schedules."""
    from adore_jax.schedule import schedule_logprobs
    from train.controller import features

    nll: dict = {}
    for m in budgets:
        for label, policy, pp, feature in policies(m):
            sched = jax.jit(policy.release_schedule)
            total = 0.0
            for row in tokens:
                tok = jnp.asarray(row[None])
                x = features(params, cfg, tok, feature or "embedding")
                total += float(-jnp.sum(schedule_logprobs(params, cfg, tok, sched(pp, x))))
            nll.setdefault(label, {})[m] = math.exp(total / (tokens.shape[0] * (tokens.shape[1] - 1)))
    return nll


def _controller_policies(gd, state, feature, protections):
    from flax import nnx

    from adore_jax.controller import feature_layer
    from adore_jax.policies import AdorePolicy

    layer = feature_layer(feature)
    assert nnx.merge(gd, state).feature_layer == layer
    return lambda m: [(f"s{s}-w{w}", AdorePolicy(m, s, w * m // 100, graphdef=gd, feature_layer=layer), state, feature)
                      for s, w in protections]


def _baseline_policies(m):
    from adore_jax.policies import RecencyPolicy

    full = RecencyPolicy(10**9)  # never full: nothing is released
    return [("full", full, None, None), ("streaming", RecencyPolicy(m, 4, m - 4), None, None),
            ("window", RecencyPolicy(m, 0, m), None, None)]


def run_worker(name: str, args) -> dict:
    """Train variant `name` (or score a reference) and score it; writes OUT/NAME/result.json."""
    from flax import nnx

    from adore_jax.controller import ASSETS, load_controller, model_signature, save_controller
    from train.controller import load_job, train, write_model_card

    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    tc = train_config("all", args) if name in REFERENCES else train_config(name, args)
    if args.timing:
        return _time_steps(name, tc, out)
    job = load_job(dataclasses.replace(tc, mix="") if name in REFERENCES else tc)
    tokens = validation_tokens(_tokenizer(), args.eval_len, args.eval_segments)
    t0 = time.perf_counter()
    result = {"variant": name, "fields": {} if name in REFERENCES else variants()[name]}
    if name == "baselines":
        result["ppl"] = schedule_scores(job.params, job.cfg, tokens, args.budgets, _baseline_policies)
    else:
        if name == "shipped":
            ctrl, meta = load_controller(ASSETS / model_signature(job.cfg))
            feature, metrics = meta.get("feature", "embedding"), meta.get("metrics", {})
        else:
            ctrl, metrics = train(job, progress=False, stop_at=args.start + args.train_seconds)
            result["steps"] = max(json.loads(line).get("step", 0) for line in open(out / "metrics.jsonl"))
            feature = tc.feature
            save_controller(out / "controller", ctrl, {"backbone": model_signature(job.cfg), "feature": feature,
                                                       "metrics": metrics, "train": dataclasses.asdict(tc)})
            write_model_card(out / "controller", tc, job, metrics, f"python -m train.variants {' '.join(args.argv)}")
        result["train_s"] = time.perf_counter() - t0
        result["metrics"] = metrics
        gd, state = nnx.split(ctrl)
        result["ppl"] = schedule_scores(job.params, job.cfg, tokens, args.budgets, _controller_policies(gd, state, feature, args.protections))
    result["seconds"] = time.perf_counter() - t0
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _time_steps(name: str, tc, out: Path) -> dict:
    """--timing: the median training step of a variant on random SmolLM2-shaped
    weights and tokens (a step's time does not depend on the values)."""
    from models.llama import init_params
    from models.shapes import SHAPES
    from train.controller import Job, train
    from train.mesh import make_mesh

    cfg = SHAPES["smollm2-135m"]
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    rows = np.random.default_rng(0).integers(0, cfg.vocab_size, (tc.batch_size * 4, tc.seq_len), dtype=np.int32)
    tc = dataclasses.replace(tc, log_every=1, eval_every=10**6, save_every=10**6, mix="")
    t0 = time.perf_counter()
    train(Job(tc, cfg, init_params(cfg, jax.random.key(0), dtype), rows, rows, make_mesh()), progress=False)
    times = [json.loads(line)["time_s"] for line in open(out / "metrics.jsonl") if '"time_s"' in line]
    result = {"variant": name, "step_s": float(np.median(np.diff(times[len(times) // 2:]))),
              "first_step_s": times[0], "seconds": time.perf_counter() - t0}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _tokenizer():
    from adore_jax.hub import resolve_model
    from models.loading import load_tokenizer

    return load_tokenizer(resolve_model(None))


def spawn(names, args) -> None:
    """Run the workers of `names` at once, one process each (logs in OUT/NAME.log)."""
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    procs = []
    for name in names:
        cmd = [sys.executable, "-m", "train.variants", f"--worker={name}", *args.argv]
        log = open(Path(args.out) / f"{name}.log", "a")
        procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
    for name, p in procs:
        rc = p.wait()
        print(f"{name}: exit {rc}", flush=True)


def table(results: dict, budgets) -> str:
    """Markdown: one row per (variant, protection), perplexity per budget, and the
    baselines; the best variant row at each m in bold."""
    rows = []
    base = results.get("baselines", {}).get("ppl", {})
    for label in ("full", "streaming", "window"):
        if label in base:
            rows.append([label, "-"] + [f"{base[label][str(m)]:.2f}" for m in budgets])
    for name, r in results.items():
        if name == "baselines":
            continue
        for prot, by_m in r["ppl"].items():
            rows.append([name, prot] + [f"{by_m[str(m)]:.2f}" for m in budgets])
    head = "| variant | protected (sinks-w recent %) | " + " | ".join(f"m={m}" for m in budgets) + " |"
    return "\n".join([head, "|" + "---|" * (len(budgets) + 2)] + ["| " + " | ".join(r) + " |" for r in rows])


def plot(results: dict, budgets, path) -> None:
    """Perplexity at the largest m for each variant's best protection, bars against
    full attention and StreamingLLM lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = str(max(budgets))
    names = [n for n in results if n != "baselines"]
    best = [min(results[n]["ppl"].values(), key=lambda d: d[m])[m] for n in names]
    fig = Figure(figsize=(7.0, 4.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.bar(range(len(names)), best, color="tab:blue")
    base = results.get("baselines", {}).get("ppl", {})
    for label, color in (("full", "black"), ("streaming", "tab:orange")):
        if label in base:
            ax.axhline(base[label][m], color=color, linestyle="--", label=label)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    lo = min(best + [base.get("full", {}).get(m, min(best))])
    ax.set_ylim(lo * 0.98, max(best) * 1.01)
    ax.set_ylabel(f"validation perplexity at m = {m}")
    ax.set_title("Controller ablation (each variant's best protection)")
    ax.legend()
    fig.savefig(path)


def main(argv=None) -> int:
    """`python -m train.variants`: run the variants (or one worker), then write the table and plot."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m train.variants", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-buckets", type=int, default=12, help="distance buckets (12: every distance >= 1024 shares one)")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--eval-len", type=int, default=8192, help="tokens per validation segment")
    p.add_argument("--eval-segments", type=int, default=6)
    p.add_argument("--budgets", default="256,1024", help="cache sizes m scored, comma-separated")
    p.add_argument("--only", default=None, help="variants to run, comma-separated (default: all and the references)")
    p.add_argument("--out", default="results/ablation")
    p.add_argument("--train-seconds", type=float, default=1e9, help="stop training after this long (then score)")
    p.add_argument("--protections", default="0-0,4-0,4-25", help="(sinks-recent %%) pairs scored for each controller")
    p.add_argument("--timing", action="store_true", help="only time each variant's step on random weights")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = [a for a in argv if not a.startswith("--worker=")]
    args.budgets = sorted({int(v) for v in args.budgets.split(",")})
    args.protections = [tuple(int(x) for x in v.split("-")) for v in args.protections.split(",")]
    args.start = time.time()
    known = [*variants(), *REFERENCES]
    names = known if args.only is None else args.only.split(",")
    if bad := [n for n in names if n not in known]:
        raise ValueError(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(known)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker is not None:
        run_worker(args.worker, args)
        return 0
    spawn([n for n in names if not (out / n / "result.json").exists()], args)
    results = {n: json.loads((out / n / "result.json").read_text()) for n in known if (out / n / "result.json").exists()}
    if args.timing:
        print(json.dumps({n: r.get("step_s") for n, r in results.items()}, indent=1))
        return 0
    (out / "ablation.json").write_text(json.dumps(dict(budgets=args.budgets, levers=LEVERS, results=results), indent=1))
    (out / "ablation.md").write_text(table(results, args.budgets) + "\n")
    if results:
        plot(results, args.budgets, out / "ablation.png")
        print(table(results, args.budgets))
    return 0 if all(n in results for n in names) else 1


if __name__ == "__main__":
    from adore_jax.cli import run_main

    sys.exit(run_main(main))
