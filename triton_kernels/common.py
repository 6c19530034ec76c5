"""Pieces every quantization kernel shares: exact rounding, constants, launch options, input checks.

The kernels must reproduce python/nanochat/quant.py bit for bit, so they avoid everything that
is "almost" IEEE on a GPU:
- division is `tl.math.div_rn` (Triton's plain `/` may lower to an approximate divide);
- rounding is round-half-to-even done with the 1.5 * 2**23 trick, exact for |x| < 2**22
  (callers clamp first), because libdevice `rint` does not exist in the interpreter;
- narrowing to bf16 goes through `round_to_bf16` (the interpreter's own fp32 -> bf16 cast
  truncates; on a GPU the cast of an already-rounded value is exact, so both agree);
- kernels launch with `enable_fp_fusion=False`, so `x * s + c` never becomes one fma with a
  different rounding than torch's separate multiply and add.
Kernels also run under TRITON_INTERPRET=1 on CPU tensors (how the tests run without a GPU);
triton.jit reads the flag when our kernels are defined, so set it before importing this package.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)
LAUNCH_OPTIONS = {} if INTERPRET else {"enable_fp_fusion": False}

EPS: tl.constexpr = tl.constexpr(1e-5)  # quant.EPS: smallest scale / absmax
FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)  # |x| <= FLT_MAX is false for inf and NaN
# fp32 quiet NaN by its bits: a NaN-valued global fails Triton 3.6's launch check that the globals a
# kernel used are unchanged (it compares with ==, and NaN != NaN), so kernels build NaN with nan_like
QUIET_NAN_BITS: tl.constexpr = tl.constexpr(0x7FC00000)
ROUND_MAGIC: tl.constexpr = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding it leaves no fraction bits


@triton.jit
def round_half_even(x):
    """fp32 round-half-to-even (torch.round) for |x| < 2**22; NaN stays NaN."""
    return (x + ROUND_MAGIC) - ROUND_MAGIC


@triton.jit
def nan_like(x):
    """fp32 quiet NaNs shaped like x."""
    return tl.full(x.shape, QUIET_NAN_BITS, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def round_to_bf16(x):
    """fp32 -> nearest-even bf16 value, still held in fp32 (NaN stays NaN, overflow gives inf)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def cast_for_store(x, ptr):
    """fp32 x cast to ptr's element type with round-to-nearest-even on every backend."""
    if ptr.dtype.element_ty == tl.bfloat16:
        x = round_to_bf16(x)
    return x.to(ptr.dtype.element_ty)


def check_runnable(t: torch.Tensor, name: str) -> None:
    """Fail with a clear message before Triton does with an obscure one."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"triton_kernels: '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"triton_kernels: '{name}' must be a floating-point tensor, got dtype {t.dtype}")
    if not t.is_cuda and not INTERPRET:
        raise ValueError(f"triton_kernels: '{name}' is on {t.device}; the Triton kernels need a CUDA tensor "
                         "(or TRITON_INTERPRET=1 set before importing triton, for CPU testing)")
