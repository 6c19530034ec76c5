"""Fused per-token int8 absmax fake-quantization of BitLinear inputs x [..., K].

Each program takes BLOCK_M tokens (rows) and walks K in chunks of BLOCK_K twice: first for the
row's absmax, then to quantize (the second read of a row comes from L2). It writes
  x_q [..., K] in x's dtype (or a requested one), and optionally q int8 [..., K] and s fp32 [..., 1],
with the arithmetic of nanochat.quant: s = 127 / max(absmax, 1e-5), q = clamp(round_half_even(x * s),
-128, 127), x_q = q / s; a token holding NaN/inf gets s NaN, q 0 and x_q NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import EPS, FLT_MAX, LAUNCH_OPTIONS, cast_for_store, check_runnable, nan_like, round_half_even

MAX_BLOCK_K = 4096  # elements of a row held per chunk
TILE = 4096  # elements per program: several short rows share one program
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def act_quant_kernel(x_ptr, xq_ptr, q_ptr, s_ptr, M, K, stride_x, stride_xq, stride_q,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, WRITE_INT8: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M

    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    bad = tl.zeros([BLOCK_M], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols[None, :] < K)
        a = tl.abs(tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32))
        amax = tl.maximum(amax, tl.max(a, axis=1))
        # NaN/inf poison the token (masked padding loads as 0, which is finite)
        bad = tl.maximum(bad, tl.max(tl.where(a <= FLT_MAX, 0, 1), axis=1))

    s = tl.math.div_rn(tl.full([BLOCK_M], 127.0, tl.float32), tl.maximum(amax, EPS))
    s = tl.where(bad > 0, nan_like(s), s)
    if WRITE_INT8:
        tl.store(s_ptr + rows, s, mask=row_ok)

    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # |x * s| <= 127 up to rounding, so clamping first keeps the magic-number rounding exact
        q = x * s[:, None]
        q = round_half_even(tl.minimum(tl.maximum(q, -128.0), 127.0))
        q = tl.where(bad[:, None] > 0, 0.0, q)
        xq = tl.math.div_rn(q, tl.broadcast_to(s[:, None], [BLOCK_M, BLOCK_K]))
        tl.store(xq_ptr + rows[:, None] * stride_xq + cols[None, :], cast_for_store(xq, xq_ptr), mask=mask)
        if WRITE_INT8:
            tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], q.to(tl.int8), mask=mask)


def act_quant(x: torch.Tensor, return_int8: bool = False, out_dtype: torch.dtype | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(x_q [..., K] in out_dtype (default x's dtype), q int8 [..., K] or None, s fp32 [..., 1] or None)."""
    check_runnable(x, "x")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"act_quant: 'out_dtype' must be one of {OUT_DTYPES}, got {out_dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"act_quant: 'x' must be [..., K] with K > 0 features per token, got shape {tuple(x.shape)}")
    shape = x.shape
    k = shape[-1]
    m = x.numel() // k
    x2 = x.reshape(m, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    xq = torch.empty((m, k), dtype=out_dtype, device=x.device)
    # without int8 outputs the kernel never touches q_ptr / s_ptr; pass real tensors, not null pointers
    q = torch.empty((m, k), dtype=torch.int8, device=x.device) if return_int8 else xq
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device) if return_int8 else xq
    block_k = min(triton.next_power_of_2(k), MAX_BLOCK_K)
    block_m = max(1, TILE // block_k)
    if m > 0:
        act_quant_kernel[(triton.cdiv(m, block_m),)](
            x2, xq, q, s, m, k, x2.stride(0), xq.stride(0), q.stride(0),
            BLOCK_M=block_m, BLOCK_K=block_k, WRITE_INT8=return_int8,
            num_warps=8 if block_k >= 2048 else 4, **LAUNCH_OPTIONS)
    xq = xq.reshape(shape)
    if not return_int8:
        return xq, None, None
    return xq, q.reshape(shape), s.reshape(*shape[:-1], 1)


def act_quant_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [..., K], s fp32 [..., 1]): the same pair as quant.act_quant_int8_ref."""
    _, q, s = act_quant(x, return_int8=True)
    return q, s
