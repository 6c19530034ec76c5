"""The ternary weight quantizer and the int8 activation quantizer: one definition, two backends.

This module is the single source of truth for the quantization arithmetic. The Triton kernels
(triton_kernels/), the export (codes + scales) and the Rust CPU kernels implement exactly this:

Weights, per output row, per group of `group_size` consecutive input weights (fp32 math):
    scale = max(mean(|w_g|), 1e-5)   for "absmean" (BitNet b1.58)   or   max(max(|w_g|), 1e-5) for "absmax"
    code  = clamp(round_half_even(w / scale), -1, 1)                  (a true division, not w * (1/scale))
    w_q   = code * scale
  When K is not a multiple of group_size, the last group is shorter and its mean is over its own elements.
  The absmean sum is accumulated in fp64 and the mean rounded once to fp32: the sum cannot overflow
  for huge weights, and it does not depend on the summation order (the Triton kernel and torch add
  in different orders), so both backends give bit-identical scales.

Activations, per token (last dim), int8 absmax (fp32 math):
    s   = 127 / max(max(|x|), 1e-5)
    q   = clamp(round_half_even(x * s), -128, 127)
    x_q = q / s

Both use the straight-through estimator: the backward pass is the identity.
Non-finite input: a NaN or inf anywhere in a group / token makes its scale NaN (weights: `scale`,
activations: `s`), its codes 0 and its fake-quantized outputs NaN (we never hide a diverged run
behind a clean-looking quantized weight). Other groups / tokens are unaffected.

Dispatch: on CUDA tensors the fused Triton kernels are used when importable; everywhere else,
and whenever NANOCHAT_QUANT_BACKEND=reference (or `force_reference(True)`), the PyTorch reference.
"""

from __future__ import annotations

import os

import torch

EPS = 1e-5
_FORCE_REFERENCE = os.environ.get("NANOCHAT_QUANT_BACKEND", "auto") == "reference"


def force_reference(flag: bool) -> None:
    """Force the PyTorch reference even on CUDA (for comparisons and debugging)."""
    global _FORCE_REFERENCE
    _FORCE_REFERENCE = flag


def _use_triton(t: torch.Tensor) -> bool:
    if _FORCE_REFERENCE or not t.is_cuda:
        return False
    try:
        import triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Reference implementation (plain PyTorch; exact definition of the arithmetic)

def _grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 view of w [N, K] as [N, G, group_size] (zero-padded) and the element count of each group [G]."""
    n, k = w.shape
    pad = (-k) % group_size
    w32 = torch.nn.functional.pad(w.float(), (0, pad)).view(n, -1, group_size)
    counts = torch.full((w32.shape[1],), group_size, dtype=torch.float32, device=w.device)
    counts[-1] = group_size - pad
    return w32, counts


def weight_scales_codes_ref(w: torch.Tensor, group_size: int, method: str = "absmean") -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (codes int8 [N, K] in {-1,0,1}, scales fp32 [N, ceil(K/group_size)])."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    n, k = w.shape
    g, counts = _grouped(w, group_size)
    if method == "absmean":
        # fp64 sum: no overflow, and the same result in any summation order (see docstring)
        scales = (g.abs().double().sum(-1) / counts.double()).float()
    elif method == "absmax":
        scales = g.abs().amax(-1)
    else:
        raise ValueError(f"weight_quant: expected 'absmean' or 'absmax', got {method!r}")
    # a NaN/inf in a group makes its mean or max non-finite (amax propagates NaN; a mean of finite
    # fp32 values is at most their max), so the [N, G] scales tell which groups are poisoned
    finite = torch.isfinite(scales)
    scales = scales.clamp(min=EPS)
    codes = torch.round(g / scales.unsqueeze(-1)).clamp(-1, 1)
    # on CPU skip the full-size pass in the usual all-finite case; on GPU, asking would sync
    if w.is_cuda or not bool(finite.all()):
        codes = torch.where(finite.unsqueeze(-1), codes, 0.0)
        scales = torch.where(finite, scales, float("nan"))
    codes = codes.reshape(n, -1)[:, :k]
    return codes.to(torch.int8), scales


def weight_quant_ref(w: torch.Tensor, group_size: int, method: str = "absmean") -> torch.Tensor:
    """Reference fake-quantized weight (codes * scale) in w's dtype; no gradient handling."""
    n, k = w.shape
    codes, scales = weight_scales_codes_ref(w, group_size, method)
    scales_full = scales.repeat_interleave(group_size, dim=1)[:, :k]
    return (codes.float() * scales_full).to(w.dtype)


def _act_int8(x32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q as fp32 integers [..., K], s fp32 [..., 1]) for fp32 x; non-finite tokens get s = NaN, q = 0."""
    amax = x32.abs().amax(-1, keepdim=True)
    finite = torch.isfinite(amax)  # amax propagates NaN and inf
    # a true division: torch computes `127.0 / tensor` as reciprocal(tensor) * 127, up to 1 ulp off
    s = torch.full_like(amax, 127.0) / amax.clamp(min=EPS)
    q = torch.round(x32 * s).clamp(-128, 127)
    # on CPU skip the full-size pass in the usual all-finite case; on GPU, asking would sync
    if x32.is_cuda or not bool(finite.all()):
        s = torch.where(finite, s, float("nan"))
        q = torch.where(finite, q, 0.0)
    return q, s


def act_quant_ref(x: torch.Tensor) -> torch.Tensor:
    """Reference per-token int8 absmax fake-quantization, in x's dtype; no gradient handling."""
    q, s = _act_int8(x.float())
    return (q / s).to(x.dtype)


def act_quant_int8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference integer form: (q int8 [..., K], s fp32 [..., 1]) with x_q = q / s."""
    q, s = _act_int8(x.float())
    return q.to(torch.int8), s


# ---------------------------------------------------------------------------------------------
# The functions the model calls (straight-through estimator, backend dispatch)

class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized tensor as is. Backward: the gradient goes to the full-precision input
    unchanged. Same as `q + (x - x.detach())` but without its two full-size passes and autograd nodes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_quantized: torch.Tensor) -> torch.Tensor:
        return x_quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _straight_through(x: torch.Tensor, x_quantized: torch.Tensor) -> torch.Tensor:
    return _StraightThrough.apply(x, x_quantized) if x.requires_grad else x_quantized


def quantize_weight(w: torch.Tensor, group_size: int, method: str = "absmean") -> torch.Tensor:
    """Fake-quantized ternary weight with STE gradient to the shadow weight w."""
    if _use_triton(w):
        from triton_kernels import weight_quant_ste
        return weight_quant_ste(w, group_size, method)
    return _straight_through(w, weight_quant_ref(w.detach(), group_size, method))


def quantize_activation(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-token int8 fake-quantized activation with STE gradient; bits=0 turns it off."""
    if bits == 0:
        return x
    if _use_triton(x):
        from triton_kernels import act_quant_ste
        return act_quant_ste(x)
    return _straight_through(x, act_quant_ref(x.detach()))


def weight_scales_codes(w: torch.Tensor, group_size: int, method: str = "absmean") -> tuple[torch.Tensor, torch.Tensor]:
    """Export view: (codes int8 [N, K], scales fp32 [N, G]) — always the reference, on CPU."""
    return weight_scales_codes_ref(w.detach().cpu(), group_size, method)
