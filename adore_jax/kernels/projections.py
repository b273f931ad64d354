"""The decode layer's projections on GPU: which go to the few-row kernels.

`FewRowMatmul` is models.llama.forward's `matmul_fn` (adore_jax.kernels.get_matmul_fn).
"""

from __future__ import annotations

import dataclasses

import jax

from adore_jax.kernels.matmul_gpu import MatmulConfig, matmul_gpu, supported
from adore_jax.kernels.qkv_gpu import qkv_rope_gpu
from adore_jax.kernels.qkv_gpu import supported as qkv_supported

PROJECTIONS = ("qkv", "o", "gate_up", "down")  # the decode layer's matmul groups, as models.llama.forward names them


@dataclasses.dataclass(frozen=True)
class FewRowMatmul:
    """models.llama.forward's `matmul_fn`: the projection groups in `groups` go
    through `matmul_gpu` when a step has at most FEW_ROWS rows; "qkv" runs with
    RoPE in one launch (kernels/qkv_gpu.py) where the head dim allows. Other
    groups, and longer chunks, stay with XLA. The default groups made the 7B
    decode step faster than XLA's matmul on an H200; gate/up, down and the LM
    head read as fast or faster in XLA (docs/KERNELS.md, "Measured on the H200").
    Hashable: a jit static argument."""

    groups: tuple[str, ...] = ("qkv", "o")
    interpret: bool = False
    config: MatmulConfig = MatmulConfig()

    def __post_init__(self):
        unknown = set(self.groups) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"unknown projection groups {sorted(unknown)} (choose from {PROJECTIONS})")

    def takes(self, group: str, x: jax.Array, ws) -> bool:
        """Whether x [M, K] times ws ([K, N_i]) of this group goes to the kernel."""
        return group in self.groups and supported(x, ws)

    def __call__(self, x: jax.Array, ws) -> list:
        return matmul_gpu(x, list(ws), interpret=self.interpret, config=self.config)

    def takes_qkv_rope(self, h: jax.Array, ws, head_dim: int) -> bool:
        """Whether the "qkv" group runs with RoPE in one launch (kernels/qkv_gpu.py)
        for h [M, E] and weights ws [E, H_i * head_dim]."""
        return "qkv" in self.groups and qkv_supported(h, ws, head_dim)

    def qkv_rope(self, h, ws, bs, cos, sin, head_dim: int) -> list:
        """rope(h @ ws + bs) (no RoPE on the third): kernels/qkv_gpu.py, h [M, E], cos/sin [M, D/2]."""
        return qkv_rope_gpu(h, ws, bs, cos, sin, head_dim=head_dim, interpret=self.interpret, config=self.config)
