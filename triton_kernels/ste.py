"""Straight-through-estimator autograd Functions over the fused quantization kernels.

Forward runs the Triton kernel; backward passes the gradient through unchanged (cast back to the
input's dtype), or, for weights with `clip_factor` set, zeroes it where |w| > clip_factor * scale.

Under torch.compile the kernels are called through torch.library custom ops (with shape-only "fake"
versions), so the compiler sees each launch as one opaque op: no graph breaks, and Inductor never
re-compiles our kernels with its own options (which could turn fp fusion back on). Eager code calls
the kernels directly: the custom-op dispatcher costs ~30 us per call, x 168 calls per nano-125m forward.

Output dtype: by default an fp32 input's fake-quantized tensor comes out in the autocast dtype when
autocast is on for its device (the matmul would cast to it anyway, so the kernel writes 2-byte
values directly and saves a pass), else in the input's dtype. The values equal the reference's
cast to that dtype (only fp32 inputs are written narrower, so there is never a double rounding).
"""

from __future__ import annotations

import torch

from .act_quant import act_quant
from .ste_clip_grad import ste_clip_grad
from .weight_quant import check_weight_args, weight_quant


@torch.library.custom_op("nanochat_triton::weight_quant", mutates_args=())
def weight_quant_op(w: torch.Tensor, group_size: int, method: str, out_dtype: torch.dtype,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    wq, scales, _ = weight_quant(w, group_size, method, out_dtype=out_dtype)
    return wq, scales


@weight_quant_op.register_fake
def _(w, group_size, method, out_dtype):
    groups = -(-w.shape[1] // group_size)
    return w.new_empty(w.shape, dtype=out_dtype), w.new_empty((w.shape[0], groups), dtype=torch.float32)


@torch.library.custom_op("nanochat_triton::act_quant", mutates_args=())
def act_quant_op(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return act_quant(x, out_dtype=out_dtype)[0]


@act_quant_op.register_fake
def _(x, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("nanochat_triton::ste_clip_grad", mutates_args=())
def ste_clip_grad_op(grad_out: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, group_size: int,
                     clip_factor: float) -> torch.Tensor:
    return ste_clip_grad(grad_out, w, scales, group_size, clip_factor)


@ste_clip_grad_op.register_fake
def _(grad_out, w, scales, group_size, clip_factor):
    return torch.empty_like(w, memory_format=torch.contiguous_format)


def default_out_dtype(t: torch.Tensor) -> torch.dtype:
    """The autocast dtype for an fp32 t when autocast is on for its device, else t's own dtype."""
    if t.dtype == torch.float32 and torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


class WeightQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, group_size, method, out_dtype, clip_factor):
        if torch.compiler.is_compiling():
            wq, scales = weight_quant_op(w, group_size, method, out_dtype)
        else:
            wq, scales, _ = weight_quant(w, group_size, method, out_dtype=out_dtype)
        ctx.w_dtype = w.dtype
        ctx.group_size = group_size
        ctx.clip_factor = clip_factor
        if clip_factor is not None:
            ctx.save_for_backward(w, scales)
        return wq

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.clip_factor is None:
            return grad_out.to(ctx.w_dtype), None, None, None, None
        w, scales = ctx.saved_tensors
        clip_grad = ste_clip_grad_op if torch.compiler.is_compiling() else ste_clip_grad
        return clip_grad(grad_out, w, scales, ctx.group_size, ctx.clip_factor), None, None, None, None


class ActQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_dtype):
        ctx.x_dtype = x.dtype
        if torch.compiler.is_compiling():
            return act_quant_op(x, out_dtype)
        return act_quant(x, out_dtype=out_dtype)[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return grad_out.to(ctx.x_dtype), None


def weight_quant_ste(w: torch.Tensor, group_size: int, method: str = "absmean",
                     out_dtype: torch.dtype | None = None, clip_factor: float | None = None) -> torch.Tensor:
    """Fake-quantized ternary weight (quant.weight_quant_ref values) with an STE gradient to w.

    clip_factor=None: plain STE (identity). A number c: gradient zeroed where |w| > c * group scale
    (c around 1.5-2 leaves every weight whose code can still flip its gradient).
    """
    check_weight_args(w, group_size, method)
    if clip_factor is not None and not clip_factor > 0:
        raise ValueError(f"weight_quant_ste: 'clip_factor' must be a positive number or None, got {clip_factor!r}")
    out_dtype = default_out_dtype(w) if out_dtype is None else out_dtype
    return WeightQuantSTE.apply(w, group_size, method, out_dtype, clip_factor)


def act_quant_ste(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-token int8 fake-quantized activation (quant.act_quant_ref values) with an STE gradient."""
    out_dtype = default_out_dtype(x) if out_dtype is None else out_dtype
    return ActQuantSTE.apply(x, out_dtype)
