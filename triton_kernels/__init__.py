"""Triton kernels for ternary quantization-aware training (fused fake-quant + STE autograd).

The arithmetic is nanochat.quant's (its docstring is the one definition); nanochat.quant dispatches
CUDA tensors here. Public API:
  weight_quant_ste(w, group_size, method, out_dtype=None, clip_factor=None)  -> w_q with STE grad
  act_quant_ste(x, out_dtype=None)                                             -> x_q with STE grad
  weight_quant(w, group_size, method, out_dtype=None, return_codes=False)     -> (w_q, scales, codes|None)
  weight_scales_codes(w, group_size, method)                                   -> (codes int8, scales f32)
  act_quant(x, return_int8=False, out_dtype=None)                             -> (x_q, q|None, s|None)
  act_quant_int8(x)                                                            -> (q int8, s f32 [..., 1])
  ste_clip_grad(grad_out, w, scales, group_size, clip_factor)                  -> clipped STE gradient
  stream_mix(w, xs)                                                            -> mHC stream mix, differentiable
Set TRITON_INTERPRET=1 before importing to run on CPU tensors (tests). See docs/triton.md.
"""

from .act_quant import act_quant, act_quant_int8
from .common import INTERPRET
from .ste import act_quant_ste, weight_quant_ste
from .ste_clip_grad import ste_clip_grad
from .stream_mix import stream_mix
from .weight_quant import weight_quant, weight_scales_codes

__all__ = ["weight_quant_ste", "act_quant_ste", "weight_quant", "weight_scales_codes",
           "act_quant", "act_quant_int8", "ste_clip_grad", "stream_mix", "INTERPRET"]
