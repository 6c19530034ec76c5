"""Compile every kernel for a real NVIDIA target without a GPU, and check the exactness-critical PTX.

The CPU tests run the kernels in the interpreter, which never sees the GPU lowering. This compiles
representative specializations through Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX ->
ptxas cubin) for sm_90 (H100/H200) and checks that what must be exact stays exact:
  - no fused multiply-add anywhere (launches use enable_fp_fusion=False; an fma would round differently),
  - every fp32 division is IEEE `div.rn.f32` (never `div.full` / `div.approx`),
  - the round-half-even magic constant 1.5 * 2**23 is both added and subtracted (not folded away);
and that every global a kernel reads equals itself: each launch re-checks them with == (Triton 3.6
on a real GPU failed on a NaN constant, which the interpreter never checks).
Run: .venv/bin/python -m triton_kernels.ptx_check      (must run without TRITON_INTERPRET)
"""

from __future__ import annotations

import importlib
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .common import INTERPRET

# the package re-exports functions under the submodules' names, so fetch the modules explicitly
MODULES = {name: importlib.import_module(f"{__package__}.{name}") for name in ("weight_quant", "act_quant", "ste_clip_grad", "stream_mix")}

WEIGHT_SIG = {"w_ptr": "*fp32", "wq_ptr": "*fp16", "scales_ptr": "*fp32", "codes_ptr": "*i8", "N": "i32", "K": "i32",
              "G": "i32", "stride_w": "i32", "stride_wq": "i32", "stride_codes": "i32", "GROUP": "constexpr",
              "BLOCK_N": "constexpr", "ABSMEAN": "constexpr", "WRITE_CODES": "constexpr"}
ACT_SIG = {"x_ptr": "*fp32", "xq_ptr": "*fp16", "q_ptr": "*i8", "s_ptr": "*fp32", "M": "i32", "K": "i32",
           "stride_x": "i32", "stride_xq": "i32", "stride_q": "i32", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr",
           "WRITE_INT8": "constexpr"}
CLIP_SIG = {"gout_ptr": "*fp16", "w_ptr": "*fp32", "scales_ptr": "*fp32", "gw_ptr": "*fp32", "N": "i32", "K": "i32",
            "G": "i32", "clip_factor": "fp32", "stride_gout": "i32", "stride_w": "i32", "stride_gw": "i32",
            "GROUP": "constexpr", "BLOCK_N": "constexpr"}
MIX_FWD_SIG = {"w_ptr": "*fp32", "x_ptr": "*fp32", "out_ptr": "*fp32", "P": "i32", "M": "constexpr", "N": "constexpr",
               "BLOCK": "constexpr"}
MIX_BWD_SIG = {"w_ptr": "*fp32", "x_ptr": "*fp32", "g_ptr": "*fp32", "gx_ptr": "*fp32", "partial_ptr": "*fp32",
               "P": "i32", "M": "constexpr", "N": "constexpr", "BLOCK": "constexpr"}

# (name, module, kernel, signature, constexprs, num_warps): the specializations the wrappers launch
SPECS = [
    ("weight_absmean_fp16_codes", "weight_quant", "weight_quant_kernel", WEIGHT_SIG,
     dict(GROUP=128, BLOCK_N=16, ABSMEAN=True, WRITE_CODES=True), 4),
    ("weight_absmax_bf16", "weight_quant", "weight_quant_kernel", dict(WEIGHT_SIG, wq_ptr="*bf16"),
     dict(GROUP=64, BLOCK_N=32, ABSMEAN=False, WRITE_CODES=False), 4),
    ("act_fp32_to_fp16_int8", "act_quant", "act_quant_kernel", ACT_SIG,
     dict(BLOCK_M=4, BLOCK_K=1024, WRITE_INT8=True), 4),
    ("act_bf16_chunked", "act_quant", "act_quant_kernel", dict(ACT_SIG, x_ptr="*bf16", xq_ptr="*bf16"),
     dict(BLOCK_M=1, BLOCK_K=4096, WRITE_INT8=False), 8),
    ("ste_clip_grad_fp16", "ste_clip_grad", "ste_clip_grad_kernel", CLIP_SIG, dict(GROUP=128, BLOCK_N=16), 4),
    ("stream_mix_fwd_write", "stream_mix", "stream_mix_fwd_kernel", MIX_FWD_SIG, dict(M=2, N=2, BLOCK=2048), 4),
    ("stream_mix_bwd_read", "stream_mix", "stream_mix_bwd_kernel", MIX_BWD_SIG, dict(M=1, N=4, BLOCK=2048), 4),
]


def compile_ptx(arch: int = 90) -> dict[str, str]:
    """PTX of every specialization in SPECS, compiled (through ptxas) for sm_<arch>."""
    if INTERPRET:
        raise RuntimeError("ptx_check: TRITON_INTERPRET is set, so the kernels are interpreted; unset it")
    target = GPUTarget("cuda", arch, 32)
    out = {}
    for name, module, kernel, signature, constexprs, num_warps in SPECS:
        fn = getattr(MODULES[module], kernel)
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                                  options=dict(num_warps=num_warps, enable_fp_fusion=False))
        out[name] = compiled.asm["ptx"]
    return out


def problems(ptx: str) -> list[str]:
    """What in one kernel's PTX breaks bit-exactness with the reference (empty when all is well)."""
    found = []
    if re.search(r"\bfma\.", ptx):
        found.append("contains fma (fp fusion would change rounding)")
    if re.search(r"\bdiv\.(full|approx)\.f32", ptx):
        found.append("contains an approximate fp32 division")
    adds, subs = ptx.count("0f4B400000"), ptx.count("0fCB400000")
    if adds != subs:
        found.append(f"round-half-even magic constant added {adds} times but subtracted {subs} times")
    return found


def unstable_globals() -> list[str]:
    """Globals used by a compiled kernel that fail the launch-time `current == compiled` check.
    Call after compile_ptx(), which records them on each JIT function."""
    found = []
    for module in MODULES.values():
        for attr in dir(module):
            used = getattr(getattr(module, attr), "used_global_vals", {})
            found += [f"{module.__name__}.{attr}: {name} = {value}" for (name, _), (value, namespace) in used.items()
                      if not namespace.get(name) == value]
    return found


def main() -> None:
    failed = False
    for name, ptx in compile_ptx().items():
        issues = problems(ptx)
        divs = len(re.findall(r"\bdiv\.rn\.f32", ptx))
        print(f"{name:<28} sm_90 ok  div.rn.f32 x{divs:<3} magic-round x{ptx.count('0f4B400000'):<3}"
              + ("  PROBLEMS: " + "; ".join(issues) if issues else ""))
        failed |= bool(issues)
    unstable = unstable_globals()
    print("globals re-checked at launch: " + ("PROBLEMS: " + "; ".join(unstable) if unstable else "all equal themselves"))
    sys.exit(1 if failed or unstable else 0)


if __name__ == "__main__":
    main()
