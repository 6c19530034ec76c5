"""Ternary and int8 CPU matmul kernels: a thin re-export of the Rust extension `nanochat._ternary`.

Build it with `maturin develop --release` (see rust/ternary_kernels). The layout is described in
docs/packed-layout.md, the kernels and their measured speed in docs/kernels.md.

    from nanochat.ternary import TernaryMatrix
    W = TernaryMatrix(codes, scales, group_size=128)   # codes int8 [M, K], scales f32 [M, ceil(K/128)]
    y = W.gemv(x)                                       # f32 [K] -> f32 [M]

Environment: NANOCHAT_THREADS (thread count), NANOCHAT_TERNARY_ISA=scalar|avx2|avx512bw|avx512vnni
(force a kernel path), NANOCHAT_SYSFS_ROOT (where to read the CPU/NUMA topology, default /sys).
"""

from nanochat._ternary import (
    DecodeLayer,
    DecodeModel,
    Int8Matrix,
    TernaryMatrix,
    active_isa,
    attend_decode,
    causal_softmax,
    mhc_read,
    mhc_write,
    num_threads,
    quantize_activations,
    rms_norm,
    rope_rows,
    set_num_threads,
    share_weight_pages,
    silu_mul,
)

__all__ = [
    "DecodeLayer",
    "DecodeModel",
    "Int8Matrix",
    "TernaryMatrix",
    "active_isa",
    "attend_decode",
    "causal_softmax",
    "mhc_read",
    "mhc_write",
    "num_threads",
    "quantize_activations",
    "rms_norm",
    "rope_rows",
    "set_num_threads",
    "share_weight_pages",
    "silu_mul",
]
