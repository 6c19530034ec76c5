"""Fused ternary weight fake-quantization: one pass over the shadow weight [N, K].

Each program takes BLOCK_N rows of one group of GROUP consecutive inputs, and writes
  w_q    [N, K] in the requested dtype (fp16/bf16 for the matmul, or fp32/fp64),
  scales [N, G] fp32, G = ceil(K / GROUP),
  codes  [N, K] int8 in {-1, 0, 1} (optional),
with exactly the arithmetic of nanochat.quant (see its docstring): absmean (sum in fp64, divided
by the group's own element count, so a short last group is fine) or absmax, scale >= 1e-5,
code = clamp(round_half_even(w / scale), -1, 1), w_q = code * scale; a group holding NaN/inf gets
scale NaN, codes 0 and w_q NaN. Traffic per weight: read 4 bytes, write 2 (+1 with codes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import EPS, FLT_MAX, LAUNCH_OPTIONS, cast_for_store, check_runnable, nan_like, round_half_even

GROUP_SIZES = (64, 128, 256)
METHODS = ("absmean", "absmax")
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def weight_quant_kernel(w_ptr, wq_ptr, scales_ptr, codes_ptr, N, K, G,
                        stride_w, stride_wq, stride_codes,
                        GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                        ABSMEAN: tl.constexpr, WRITE_CODES: tl.constexpr):
    g = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = g * GROUP + tl.arange(0, GROUP)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols[None, :] < K)
    w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a = tl.abs(w)

    # a group with any NaN/inf is poisoned (the masked padding loads as 0, which is finite)
    bad = tl.max(tl.where(a <= FLT_MAX, 0, 1), axis=1) > 0
    if ABSMEAN:
        count = tl.minimum(K - g * GROUP, GROUP).to(tl.float64)
        scale = (tl.sum(a.to(tl.float64), axis=1) / count).to(tl.float32)
    else:
        scale = tl.max(a, axis=1)
    scale = tl.maximum(scale, EPS)

    # clamping to [-2, 2] before rounding keeps the magic-number rounding exact and changes nothing
    q = tl.math.div_rn(w, scale[:, None])
    q = tl.minimum(tl.maximum(q, -2.0), 2.0)
    q = tl.minimum(tl.maximum(round_half_even(q), -1.0), 1.0)
    q = tl.where(bad[:, None], 0.0, q)
    scale = tl.where(bad, nan_like(scale), scale)
    wq = q * scale[:, None]

    tl.store(wq_ptr + rows[:, None] * stride_wq + cols[None, :], cast_for_store(wq, wq_ptr), mask=mask)
    tl.store(scales_ptr + rows * G + g, scale, mask=row_ok)
    if WRITE_CODES:
        tl.store(codes_ptr + rows[:, None] * stride_codes + cols[None, :], q.to(tl.int8), mask=mask)


def check_weight_args(w: torch.Tensor, group_size: int, method: str) -> None:
    check_runnable(w, "w")
    if w.dim() != 2:
        raise ValueError(f"weight_quant: 'w' must be 2-D [out, in], got shape {tuple(w.shape)}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"weight_quant: 'group_size' must be one of {GROUP_SIZES}, got {group_size!r}")
    if method not in METHODS:
        raise ValueError(f"weight_quant: 'method' must be 'absmean' or 'absmax', got {method!r}")


def weight_quant(w: torch.Tensor, group_size: int, method: str = "absmean",
                 out_dtype: torch.dtype | None = None, return_codes: bool = False,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(w_q [N, K] in out_dtype (default w.dtype), scales fp32 [N, G], codes int8 [N, K] or None)."""
    check_weight_args(w, group_size, method)
    out_dtype = w.dtype if out_dtype is None else out_dtype
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"weight_quant: 'out_dtype' must be one of {OUT_DTYPES}, got {out_dtype}")
    if w.stride(1) != 1:
        w = w.contiguous()
    n, k = w.shape
    g = triton.cdiv(k, group_size)
    wq = torch.empty((n, k), dtype=out_dtype, device=w.device)
    scales = torch.empty((n, g), dtype=torch.float32, device=w.device)
    # without codes the kernel never touches codes_ptr; pass wq rather than a null pointer
    codes = torch.empty((n, k), dtype=torch.int8, device=w.device) if return_codes else wq
    block_n = max(1, 2048 // group_size)  # ~2k weights per program: enough bytes in flight per SM
    grid = (triton.cdiv(n, block_n), g)
    if n > 0 and k > 0:
        weight_quant_kernel[grid](
            w, wq, scales, codes, n, k, g, w.stride(0), wq.stride(0), codes.stride(0),
            GROUP=group_size, BLOCK_N=block_n, ABSMEAN=(method == "absmean"), WRITE_CODES=return_codes,
            num_warps=4, **LAUNCH_OPTIONS)
    return wq, scales, (codes if return_codes else None)


def weight_scales_codes(w: torch.Tensor, group_size: int, method: str = "absmean") -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [N, K], scales fp32 [N, G]): the same pair as quant.weight_scales_codes_ref."""
    _, scales, codes = weight_quant(w, group_size, method, out_dtype=torch.float16, return_codes=True)
    return codes, scales
