"""Backward of the clipped straight-through estimator for ternary weights.

grad_w = grad_out where |w| <= clip_factor * scale of w's group, else 0 (fp32 compare; the product
clip_factor * scale is rounded to fp32 first). A weight far outside its group's range keeps code +-1
however far it moves, so pushing it further only inflates the shadow weight; clipping stops that.
A NaN scale (non-finite group) compares false: the whole group gets zero gradient.
Output dtype is w's dtype (the fp32 shadow weight), whatever grad_out's dtype (fp16 under autocast).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LAUNCH_OPTIONS, cast_for_store


@triton.jit
def ste_clip_grad_kernel(gout_ptr, w_ptr, scales_ptr, gw_ptr, N, K, G, clip_factor,
                         stride_gout, stride_w, stride_gw,
                         GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    g = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = g * GROUP + tl.arange(0, GROUP)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols[None, :] < K)
    w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gout = tl.load(gout_ptr + rows[:, None] * stride_gout + cols[None, :], mask=mask, other=0.0)
    scale = tl.load(scales_ptr + rows * G + g, mask=row_ok, other=0.0)
    limit = clip_factor * scale
    keep = tl.abs(w) <= limit[:, None]
    gw = tl.where(keep, gout.to(tl.float32), 0.0)
    tl.store(gw_ptr + rows[:, None] * stride_gw + cols[None, :], cast_for_store(gw, gw_ptr), mask=mask)


def ste_clip_grad(grad_out: torch.Tensor, w: torch.Tensor, scales: torch.Tensor,
                  group_size: int, clip_factor: float) -> torch.Tensor:
    """Clipped STE gradient for w [N, K] given its group scales [N, G]; returns w's dtype."""
    n, k = w.shape
    g = triton.cdiv(k, group_size)
    if grad_out.shape != w.shape or scales.shape != (n, g):
        raise ValueError(f"ste_clip_grad: expected grad_out {tuple(w.shape)} and scales {(n, g)}, "
                         f"got {tuple(grad_out.shape)} and {tuple(scales.shape)}")
    grad_out = grad_out if grad_out.stride(1) == 1 else grad_out.contiguous()
    w = w if w.stride(1) == 1 else w.contiguous()
    scales = scales.contiguous()
    gw = torch.empty_like(w, memory_format=torch.contiguous_format)
    block_n = max(1, 2048 // group_size)
    if n > 0 and k > 0:
        ste_clip_grad_kernel[(triton.cdiv(n, block_n), g)](
            grad_out, w, scales, gw, n, k, g, float(clip_factor),
            grad_out.stride(0), w.stride(0), gw.stride(0),
            GROUP=group_size, BLOCK_N=block_n, num_warps=4, **LAUNCH_OPTIONS)
    return gw
