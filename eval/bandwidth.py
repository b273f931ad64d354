"""Measured device copy bandwidth: the roofline's denominator in eval.throughput
and eval/bench_kernels.py (bytes read + written per second)."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def _median_s(call, reps: int) -> float:
    call()  # compile / warm
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 10) -> dict:
    """{"xla": an XLA elementwise copy of `nbytes`, "torch": torch's copy_ (CUDA only),
    "best": the larger} in bytes/s, each the median of `reps` timed copies."""
    x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.float32).astype(jnp.bfloat16)
    f = jax.jit(lambda x: -x)
    out = {"xla": 2 * nbytes / _median_s(lambda: f(x).block_until_ready(), reps)}
    del x
    try:
        import torch

        if torch.cuda.is_available():
            src = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
            dst = torch.empty_like(src)

            def copy():
                dst.copy_(src)
                torch.cuda.synchronize()

            out["torch"] = 2 * nbytes / _median_s(copy, reps)
            del src, dst
            torch.cuda.empty_cache()
    except ImportError:  # no torch: the XLA copy stands alone
        pass
    out["best"] = max(out.values())
    return out
