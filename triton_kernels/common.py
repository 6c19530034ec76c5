"""Pieces every quantization kernel shares: exact rounding, constants, launch options, input checks.

The kernels must reproduce python/nanochat/quant.py bit for bit, so they avoid everything that
is "almost" IEEE on a GPU:
- division is `tl.math.div_rn` (Triton's plain `/` may lower to an approximate divide);
- rounding is round-half-to-even done with the 1.5 * 2**23 trick, exact for |x| < 2**22
  (callers clamp first), because libdevice `rint` does not exist in the interpreter;
- kernels launch with `enable_fp_fusion=False`, so `x * s + c` never becomes one fma with a
  different rounding than torch's separate multiply and add.
Kernels also run under TRITON_INTERPRET=1 on CPU tensors (how the tests run without a GPU);
that mode is fixed when triton is first imported, so set the variable before importing us.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)
LAUNCH_OPTIONS = {} if INTERPRET else {"enable_fp_fusion": False}

EPS: tl.constexpr = tl.constexpr(1e-5)  # quant.EPS: smallest scale / absmax
FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)  # |x| <= FLT_MAX is false for inf and NaN
NAN: tl.constexpr = tl.constexpr(float("nan"))
ROUND_MAGIC: tl.constexpr = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding it leaves no fraction bits


@triton.jit
def round_half_even(x):
    """fp32 round-half-to-even (torch.round) for |x| < 2**22; NaN stays NaN."""
    return (x + ROUND_MAGIC) - ROUND_MAGIC


def check_runnable(t: torch.Tensor, name: str) -> None:
    """Fail with a clear message before Triton does with an obscure one."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"triton_kernels: '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"triton_kernels: '{name}' must be a floating-point tensor, got dtype {t.dtype}")
    if not t.is_cuda and not INTERPRET:
        raise ValueError(f"triton_kernels: '{name}' is on {t.device}; the Triton kernels need a CUDA tensor "
                         "(or TRITON_INTERPRET=1 set before importing triton, for CPU testing)")
