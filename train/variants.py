"""Decide the controller's feature and loss by held-out recall, then train the default.

    python -m train.variants --steps 300 --final-steps 1500 --out results/controller

Trains every (feature, loss) variant of DESIGN.md for --steps steps on the same
data and seed, evaluates all on held-out Persuasion sequences, writes
variants.json and variants.md (recall@m, precision@m, AUC), then trains the
best variant (by held-out recall@256, or the largest m below it) for --final-steps steps and writes it to
OUT/controller with a model card. --final FEATURE/LOSS skips the variants and
trains that one. The decode engine reads either input (embedding or hidden:l).
With --compare-devices it also times the same step on one device and on all
devices (data parallel) and reports the ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from adore_jax.controller import model_signature, recency_controller, save_controller
from models.llama import init_params
from models.shapes import SHAPES
from train.controller import Job, TrainConfig, eval_step, evaluate, load_job, train, write_model_card
from train.mesh import fsdp_specs, make_mesh

VARIANTS = [("embedding", "bce"), ("embedding", "listwise"), ("hidden:8", "bce"), ("hidden:8", "listwise")]


def _table(results: dict) -> str:
    keys = sorted({k for r in results.values() for k in r if k.startswith("recall@")}, key=lambda k: int(k.split("@")[1]))
    head = "| feature | loss | " + " | ".join(keys) + " | precision@" + keys[0].split("@")[1] + " | AUC |"
    lines = [head, "|" + "---|" * (len(keys) + 4)]
    for name, r in results.items():
        feat, loss = name.split("/")
        p = r["precision@" + keys[0].split("@")[1]]
        lines.append(f"| {feat} | {loss} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + f" | {p:.3f} | {r['auc']:.3f} |")
    return "\n".join(lines)


def compare_devices(tc: TrainConfig, steps: int = 30) -> dict:
    """Median training step time on one device and data parallel over all devices,
    same global batch. Random SmolLM2-shaped weights and tokens: a step's time does
    not depend on the values."""
    cfg = SHAPES["smollm2-135m"]
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    params = init_params(cfg, jax.random.key(0), dtype)
    rows = np.random.default_rng(0).integers(0, cfg.vocab_size, (tc.batch_size * 8, tc.seq_len), dtype=np.int32)
    out = {}
    for n in sorted({1, jax.device_count()}):
        mesh = make_mesh(n, 1)
        run = dataclasses.replace(tc, out=f"{tc.out}/timing-{n}", steps=steps, save_every=10**6, eval_every=10**6)
        job = Job(run, cfg, jax.device_put(params, fsdp_specs(params, mesh)), rows, rows[: tc.batch_size], mesh)
        train(job, progress=False)
        times = [json.loads(l)["time_s"] for l in open(Path(run.out) / "metrics.jsonl") if '"time_s"' in l]
        out[f"{n} device(s)"] = float(np.median(np.diff(times[len(times) // 2:])) / run.log_every)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.variants")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--final-steps", type=int, default=1500)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--out", default="results/controller")
    p.add_argument("--compare-devices", action="store_true", help="also time 1 device vs all (data parallel)")
    p.add_argument("--compare-only", action="store_true", help="only the device comparison")
    p.add_argument("--final", default=None, help="FEATURE/LOSS (e.g. hidden:8/bce): skip the variants, train this one")
    args = p.parse_args(argv)
    base = TrainConfig(seq_len=args.seq_len, batch_size=args.batch_size, eval_batches=args.eval_batches,
                       eval_every=10**6, save_every=10**6, out=args.out)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"devices": [str(d) for d in jax.devices()], "steps": args.steps}
    if args.compare_devices or args.compare_only:
        report["step_time_s"] = compare_devices(base)
        print("step time:", json.dumps(report["step_time_s"]), flush=True)
        if args.compare_only:
            (out / "devices.json").write_text(json.dumps(report, indent=2))
            return 0
    results = {}
    if args.final is not None:
        feature, _, loss = args.final.partition("/")
        return _final(base, feature, loss, args, argv, out, results)
    for feat, loss in VARIANTS:
        tc = dataclasses.replace(base, feature=feat, loss=loss, steps=args.steps, out=str(out / f"{feat.replace(':', '')}-{loss}"))
        t0 = time.perf_counter()
        _, metrics = train(load_job(tc), progress=True)
        results[f"{feat}/{loss}"] = {**metrics, "train_s": time.perf_counter() - t0}
        print(feat, loss, json.dumps(metrics), flush=True)
        (out / "variants.json").write_text(json.dumps({**report, "variants": results}, indent=2))
    job = load_job(dataclasses.replace(base, out=str(out / "recency")))
    gd, state = nnx.split(recency_controller(job.cfg.hidden_size, base.d_c))
    results["recency (reference)/-"] = evaluate(job, gd, state, jax.jit(functools.partial(eval_step, gd, base, job.cfg)))
    report["variants"] = results
    (out / "variants.json").write_text(json.dumps(report, indent=2))
    (out / "variants.md").write_text(_table(results) + "\n")
    names = [f"{f}/{l}" for f, l in VARIANTS]
    key = max((k for k in results[names[0]] if k.startswith("recall@")), key=lambda k: min(int(k[7:]), 256))
    best = max(names, key=lambda v: results[v][key])  # by recall@256 (or the largest m measured below it)
    feature, _, loss = best.partition("/")
    return _final(base, feature, loss, args, argv, out, results)


def _final(base: TrainConfig, feature: str, loss: str, args, argv, out: Path, results: dict) -> int:
    """Train (feature, loss) for --final-steps and write OUT/controller with its model card."""
    tc = dataclasses.replace(base, feature=feature, loss=loss, steps=args.final_steps, eval_every=500,
                             out=str(out / "final")).validate()
    job = load_job(tc)
    ctrl, metrics = train(job)
    final = out / "controller"
    save_controller(final, ctrl, {"backbone": model_signature(job.cfg), "loss": loss, "metrics": metrics})
    write_model_card(final, tc, job, metrics, "python -m train.variants " + " ".join(sys.argv[1:] if argv is None else argv))
    if results:
        print(_table(results))
    print("final", feature, loss, json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
