"""Kernels and the platform switch.

    attn_fn = get_attention_fn()            # "auto": Pallas kernel of the default backend, reference on CPU
    attn_fn = get_attention_fn("pallas_gpu", interpret=True)   # any backend, forced
    update_fn = get_cache_update_fn()       # same switch for the in-place cache update
    matmul_fn = get_matmul_fn()             # decode projections: the few-row kernels on GPU, else None (XLA)
    default_kernels()                       # the three above, as the decode engine picks them by default

Backends: "reference" (XLA: models.attention.reference_attention and
models.cache.write_rows), "pallas_gpu" (Pallas, Triton lowering),
"pallas_tpu" (Pallas, Mosaic TPU). With backend="auto" the environment variable
ADORE_KERNEL_BACKEND, when set, forces one of them; an explicit backend
argument wins over it. The decode kernels take T <= 16 new rows (G * T <= 128). Longer
chunks (prefill) go on GPU to a prefill kernel (a tile of rows per program,
reading the cache in place) unless statistics are asked for; otherwise, and on
TPU, to XLA's `blockwise_attention`, which visits the slots in blocks so a long
chunk never holds its whole score matrix. So does a head dim that is not a
power of two on GPU.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import jax

from adore_jax.kernels.attention_gpu import GpuConfig, sparse_attention_gpu
from adore_jax.kernels.attention_tpu import TpuConfig, sparse_attention_tpu
from adore_jax.kernels.blockwise import blockwise_attention
from adore_jax.kernels.cache_update import cache_update_gpu, cache_update_tpu
from adore_jax.kernels.matmul_gpu import MatmulConfig, matmul_gpu, reference_matmul
from adore_jax.kernels.projections import PROJECTIONS, FewRowMatmul
from adore_jax.kernels.qkv_gpu import qkv_rope_gpu, reference_qkv_rope
from adore_jax.kernels.prefill_gpu import PrefillConfig, prefill_attention_gpu
from models.attention import AttentionOut, reference_attention
from models.cache import KVCache, write_rows

ENV_VAR = "ADORE_KERNEL_BACKEND"
BACKENDS = ("auto", "reference", "pallas_gpu", "pallas_tpu")

# Which backends can return the attention statistics (mass, lse).
SUPPORTS_STATS = {"reference": True, "pallas_gpu": True, "pallas_tpu": True}

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "GpuConfig",
    "PrefillConfig",
    "TpuConfig",
    "AttentionKernel",
    "FewRowMatmul",
    "MatmulConfig",
    "PROJECTIONS",
    "blockwise_attention",
    "cache_update_gpu",
    "cache_update_tpu",
    "default_kernels",
    "get_attention_fn",
    "get_cache_update_fn",
    "get_matmul_fn",
    "matmul_gpu",
    "qkv_rope_gpu",
    "prefill_attention_gpu",
    "reference_matmul",
    "reference_qkv_rope",
    "resolve_backend",
    "sparse_attention_gpu",
    "sparse_attention_tpu",
]


def resolve_backend(backend: str = "auto") -> str:
    """Concrete backend name for `backend` ("auto" consults ADORE_KERNEL_BACKEND, then the platform)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"{ENV_VAR}={env!r} is not a kernel backend; choose one of {BACKENDS}")
            backend = env
    if backend == "auto":
        backend = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend(), "reference")
    return backend


class AttentionKernel:
    """An attention function with the signature of `reference_attention`."""

    def __init__(self, backend: str, fn: Callable, supports_stats: bool):
        self.backend = backend
        self.supports_stats = supports_stats
        self._fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, q, k, v, cache_k, cache_v, cache_pos, q_pos, *, layer=None, with_stats: bool = False,
                 scale=None) -> AttentionOut:
        if with_stats and not self.supports_stats:
            raise ValueError(
                f"attention backend {self.backend!r} cannot return statistics (mass, lse); "
                "use with_stats=False or the 'reference' backend"
            )
        return self._fn(q, k, v, cache_k, cache_v, cache_pos, q_pos, layer=layer, with_stats=with_stats, scale=scale)

    def __repr__(self):
        return f"AttentionKernel({self.backend!r})"

    def __hash__(self):  # usable as a jit static argument
        return hash((self.backend, self._fn))

    def __eq__(self, other):
        return isinstance(other, AttentionKernel) and (self.backend, self._fn) == (other.backend, other._fn)


def get_attention_fn(
    backend: str = "auto",
    interpret: bool = False,
    *,
    gpu_config: Optional[GpuConfig] = None,
    tpu_config: Optional[TpuConfig] = None,
) -> AttentionKernel:
    """Attention function for `backend` ("auto" | "reference" | "pallas_gpu" | "pallas_tpu").
    Equal arguments give the same object, so jitted callers that take it as a
    static argument compile once."""
    return _attention_fn(resolve_backend(backend), interpret, gpu_config, tpu_config)


@functools.lru_cache(maxsize=None)
def _attention_fn(name: str, interpret: bool, gpu_config, tpu_config) -> AttentionKernel:
    if name == "reference":
        fn = reference_attention
    elif name == "pallas_gpu":
        fn = functools.partial(sparse_attention_gpu, interpret=interpret, config=gpu_config or GpuConfig())
    else:
        fn = functools.partial(sparse_attention_tpu, interpret=interpret, config=tpu_config or TpuConfig())
    return AttentionKernel(name, fn, SUPPORTS_STATS[name])


def get_cache_update_fn(backend: str = "auto", interpret: bool = False) -> Callable[..., KVCache]:
    """Cache update `(cache, new_k, new_v, slots, positions) -> KVCache` for `backend`.

    The reference is models.cache.write_rows (XLA scatter); the kernels write
    in place through input_output_aliases (donate the cache in the caller's jit).
    """
    return _cache_update_fn(resolve_backend(backend), interpret)


@functools.lru_cache(maxsize=None)
def _cache_update_fn(name: str, interpret: bool) -> Callable[..., KVCache]:
    if name == "reference":
        return write_rows
    if name == "pallas_gpu":
        return functools.partial(cache_update_gpu, interpret=interpret)
    return functools.partial(cache_update_tpu, interpret=interpret)


def get_matmul_fn(backend: str = "auto", interpret: bool = False, **kw) -> Optional[FewRowMatmul]:
    """The decode projections' `matmul_fn` for `backend`: the few-row kernel on
    "pallas_gpu" (kw: FewRowMatmul's groups, config), None (XLA's matmul, the
    reference) elsewhere. TPU: XLA's matmul; no kernel was written for it."""
    return FewRowMatmul(interpret=interpret, **kw) if resolve_backend(backend) == "pallas_gpu" else None


def default_kernels() -> dict:
    """The decode engine's kernels when none are given (EngineConfig's "auto"):
    {attn_fn, cache_update, matmul_fn} of the Pallas GPU kernels on GPU, or of
    the backend ADORE_KERNEL_BACKEND names; XLA's reference elsewhere. The TPU
    kernels have not run on TPU hardware, so on TPU they are opt-in
    (ADORE_KERNEL_BACKEND=pallas_tpu). The kernels take operands on one device;
    with a mesh (EngineConfig.mesh) they run under shard_map on each shard's
    slice (adore_jax.sharding)."""
    name = resolve_backend("auto")
    if name == "pallas_tpu" and not os.environ.get(ENV_VAR, "").strip():
        name = "reference"
    return dict(attn_fn=get_attention_fn(name), cache_update=get_cache_update_fn(name), matmul_fn=get_matmul_fn(name))
