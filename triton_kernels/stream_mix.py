"""Mixing of mHC residual streams, fused: out[i] = sum_j w[i, j] X[j] for w [m, n], X [n, P] fp32.

n is 2 or 4 (the stream count) and m is 1 (the read of a sublayer input) or n (the write). Each
program takes BLOCK positions of all n streams, so every value is read once and written once per
pass: forward X -> out, backward (g, X) -> grad X = w^T g plus one [m, n] partial sum of g[i] * X[j]
per program (summed by the wrapper). PyTorch's broadcast multiply-and-sum materialized [m, n, P]
both ways in unvectorized kernels, and a [m, n] @ [n, P] matmul runs as a SIMT sgemm; on a
nano-125m step (H200) each cost ~80 ms of ~205-240.

The reference is `stream_mix_ref` (the broadcast formula); sums of 2-4 products in another order, so
the two agree to fp32 rounding, not bit for bit (mixing is not part of the quantization contract).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LAUNCH_OPTIONS, check_runnable

BLOCK = 2048  # positions per program


@triton.jit
def stream_mix_fwd_kernel(w_ptr, x_ptr, out_ptr, P, M: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < P
    streams = tl.arange(0, N)
    xs = tl.load(x_ptr + streams[:, None].to(tl.int64) * P + offs[None, :], mask=ok[None, :], other=0.0)
    for i in tl.static_range(M):
        w_row = tl.load(w_ptr + i * N + streams)  # w[i, :]
        tl.store(out_ptr + i * P + offs, tl.sum(w_row[:, None] * xs, axis=0), mask=ok)


@triton.jit
def stream_mix_bwd_kernel(w_ptr, x_ptr, g_ptr, gx_ptr, partial_ptr, P, M: tl.constexpr, N: tl.constexpr,
                          BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < P
    streams = tl.arange(0, N)
    xs = tl.load(x_ptr + streams[:, None].to(tl.int64) * P + offs[None, :], mask=ok[None, :], other=0.0)
    gx = tl.zeros([N, BLOCK], dtype=tl.float32)
    for i in tl.static_range(M):
        g_i = tl.load(g_ptr + i * P + offs, mask=ok, other=0.0)
        w_row = tl.load(w_ptr + i * N + streams)  # w[i, :]
        gx += w_row[:, None] * g_i[None, :]  # grad X[j] += w[i, j] g[i]
        tl.store(partial_ptr + (pid * M + i) * N + streams, tl.sum(xs * g_i[None, :], axis=1))
    tl.store(gx_ptr + streams[:, None].to(tl.int64) * P + offs[None, :], gx, mask=ok[None, :])


def _check(w: torch.Tensor, xs: torch.Tensor) -> None:
    check_runnable(w, "w")
    check_runnable(xs, "xs")
    if w.dtype != torch.float32 or xs.dtype != torch.float32:
        raise TypeError(f"stream_mix: expected float32 w and xs, got {w.dtype} and {xs.dtype}")
    if w.dim() != 2 or xs.dim() < 2 or w.shape[1] != xs.shape[0] or xs.shape[0] not in (2, 4):
        raise ValueError(f"stream_mix: expected w [m, n] and xs [n, ..., D] with n 2 or 4, got {tuple(w.shape)} "
                         f"and {tuple(xs.shape)}")


def stream_mix_fwd(w: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    _check(w, xs)
    m, n = w.shape
    x = xs.reshape(n, -1).contiguous()
    out = torch.empty((m, x.shape[1]), dtype=torch.float32, device=xs.device)
    stream_mix_fwd_kernel[(triton.cdiv(x.shape[1], BLOCK),)](w.contiguous(), x, out, x.shape[1], M=m, N=n,
                                                               BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return out.view(m, *xs.shape[1:])


def stream_mix_bwd(w: torch.Tensor, xs: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad w [m, n], grad xs like xs) for out = stream_mix(w, xs) and grad = d loss / d out."""
    _check(w, xs)
    m, n = w.shape
    x = xs.reshape(n, -1).contiguous()
    g = grad.to(torch.float32).reshape(m, -1).contiguous()
    programs = triton.cdiv(x.shape[1], BLOCK)
    gx = torch.empty_like(x)
    partial = torch.empty((programs, m, n), dtype=torch.float32, device=xs.device)
    stream_mix_bwd_kernel[(programs,)](w.contiguous(), x, g, gx, partial, x.shape[1], M=m, N=n, BLOCK=BLOCK,
                                       **LAUNCH_OPTIONS)
    return partial.sum(0), gx.view(xs.shape)


class StreamMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w, xs)
        return stream_mix_fwd(w, xs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, xs = ctx.saved_tensors
        grad_w, grad_xs = stream_mix_bwd(w, xs, grad)
        return grad_w, grad_xs


def stream_mix(w: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """out [m, ..., D] = sum_j w[i, j] xs[j] for w [m, n], xs [n, ..., D] (fp32), differentiable in both."""
    return StreamMix.apply(w, xs)


def stream_mix_ref(w: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """The PyTorch reference: broadcast multiply and sum."""
    return (w.view(*w.shape, *([1] * (xs.dim() - 1))) * xs.unsqueeze(0)).sum(1)
