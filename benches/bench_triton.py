"""GPU benchmark of the Triton QAT kernels and of the nano-125m fp16 training step.

1. Checks on the GPU that the fused kernels give exactly the reference's codes, scales and outputs.
2. Times the fused weight-quant kernel (fp32 shadow -> fp16 w_q + fp32 scales) against the eager
   PyTorch reference for every BitLinear weight shape of the chosen presets, and the activation
   kernel for their input widths; reports achieved GB/s and % of the device's peak bandwidth.
3. Times whole nano-125m training steps (fp16 autocast + GradScaler, fused AdamW): plain fp16
   linears (GPT.set_quantization(False)), QAT through the Triton kernels, and QAT through the eager
   reference (quant.force_reference(True)); reports tokens/s, MFU and the QAT overhead.

Needs a CUDA GPU; without one it exits with status 1 (it never falls back to the CPU).
Run:
  .venv/bin/python benches/bench_triton.py                       # everything, default sizes
  .venv/bin/python benches/bench_triton.py --skip-train --presets nano-125m,medium-3b
  .venv/bin/python benches/bench_triton.py --batch-size 8 --seq-len 2048 --steps 20 --json runs/bench_triton.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

import torch  # noqa: E402

DEVICE = "cuda"  # the one device this script measures; main() refuses to run without it

# (name fragment, peak memory bandwidth bytes/s, dense fp16/bf16 tensor-core FLOP/s); first match wins
DEVICE_PEAKS = [
    ("H200", 4.8e12, 989e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),  # SXM
]


def device_peaks(name: str) -> tuple[float | None, float | None]:
    """(peak bytes/s, peak FLOP/s) of a device from its name, (None, None) if unknown."""
    for fragment, bandwidth, flops in DEVICE_PEAKS:
        if fragment.lower() in name.lower():
            return bandwidth, flops
    return None, None


def bitlinear_shapes(preset_name: str) -> list[tuple[str, int, int]]:
    """(role, out N, in K) of every distinct BitLinear weight of one transformer block of a preset."""
    from nanochat.config import preset
    c = preset(preset_name)
    hd = c.head_dim
    return [("q", c.n_heads * hd, c.dim), ("k/v", c.n_kv_heads * hd, c.dim), ("o", c.dim, c.n_heads * hd),
            ("gate/up", c.ffn_hidden, c.dim), ("down", c.dim, c.ffn_hidden)]


def time_ms(fn) -> float:
    """Median milliseconds per call (triton's do_bench flushes L2 between calls)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def percent(value: float, peak: float | None) -> str:
    return f"{100 * value / peak:5.1f}%" if peak else "    ?"


# ---------------------------------------------------------------------------------------------
# 1. exactness on the GPU

def check_exact(presets: list[str]) -> None:
    """Kernel == reference on CUDA tensors for each shape (ties, zero and non-finite groups included)."""
    import triton_kernels as tk
    from nanochat import quant
    failures = []
    torch.manual_seed(0)
    for preset_name in presets:
        for role, n, k in bitlinear_shapes(preset_name):
            w = torch.randn(n, k, device=DEVICE) * 0.02
            w[0, :64] = torch.tensor([0.5, 1.5, -0.5, -1.5], device=DEVICE).repeat(16) * 2.0**-7  # exact .5 ties (mean |w| = 2^-7)
            w[1, :128] = 0.0
            w[2, 5] = float("nan")
            for method in ("absmean", "absmax"):
                wq, scales, codes = tk.weight_quant(w, 128, method, out_dtype=torch.float16, return_codes=True)
                codes_ref, scales_ref = quant.weight_scales_codes_ref(w, 128, method)
                wq_ref = quant.weight_quant_ref(w, 128, method).half()
                for what, got, want in (("codes", codes, codes_ref), ("scales", scales, scales_ref), ("w_q", wq, wq_ref)):
                    if not torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0)) or not torch.equal(got.isnan(), want.isnan()):
                        failures.append(f"{preset_name} {role} [{n},{k}] {method} {what}")
            x = torch.randn(64, k, device=DEVICE) * 3
            x[0, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5], device=DEVICE)
            x[0, 6:] = 0.0
            _, q, s = tk.act_quant(x, return_int8=True)
            q_ref, s_ref = quant.act_quant_int8_ref(x)
            if not (torch.equal(q, q_ref) and torch.equal(s, s_ref)):
                failures.append(f"{preset_name} activation K={k}")
    if failures:
        sys.exit("bench_triton: the Triton kernels differ from the reference on this GPU:\n  " + "\n  ".join(failures))
    print("exactness: Triton kernels == reference on CUDA for every shape (codes, scales, outputs, int8 activations)")


# ---------------------------------------------------------------------------------------------
# 2. kernel bandwidth

def bench_weight_kernels(presets: list[str], peak_bw: float | None) -> list[dict]:
    import triton_kernels as tk
    from nanochat import quant
    rows = []
    print("\nweight quant (fp32 shadow -> fp16 w_q + fp32 scales), group 128, absmean")
    print(f"{'preset':<11} {'weight':<8} {'N x K':>12} {'fused us':>9} {'GB/s':>7} {'%peak':>6} {'eager us':>9} {'GB/s':>7} {'speedup':>7}")
    for preset_name in presets:
        for role, n, k in bitlinear_shapes(preset_name):
            w = torch.randn(n, k, device=DEVICE) * 0.02
            nbytes = n * k * 4 + n * k * 2 + n * (k // 128) * 4
            fused = time_ms(lambda: tk.weight_quant(w, 128, "absmean", out_dtype=torch.float16))
            eager = time_ms(lambda: quant.weight_quant_ref(w, 128, "absmean").half())
            gbs, gbs_eager = nbytes / fused / 1e6, nbytes / eager / 1e6
            print(f"{preset_name:<11} {role:<8} {f'{n}x{k}':>12} {fused * 1e3:9.1f} {gbs:7.0f} {percent(gbs * 1e9, peak_bw):>6} "
                  f"{eager * 1e3:9.1f} {gbs_eager:7.0f} {eager / fused:6.1f}x")
            rows.append(dict(kind="weight", preset=preset_name, weight=role, n=n, k=k, fused_us=fused * 1e3,
                             fused_gbs=gbs, eager_us=eager * 1e3, eager_gbs=gbs_eager,
                             fused_pct_peak=(100 * gbs * 1e9 / peak_bw) if peak_bw else None))
    return rows


def bench_act_kernels(presets: list[str], tokens: int, peak_bw: float | None) -> list[dict]:
    import triton_kernels as tk
    from nanochat import quant
    rows = []
    print(f"\nactivation quant, {tokens} tokens, fp32 in -> fp16 out (the autocast path)")
    print(f"{'preset':<11} {'K':>6} {'fused us':>9} {'GB/s':>7} {'%peak':>6} {'eager us':>9} {'GB/s':>7} {'speedup':>7}")
    for preset_name in presets:
        for k in sorted({k for _, _, k in bitlinear_shapes(preset_name)}):
            x = torch.randn(tokens, k, device=DEVICE)
            nbytes = tokens * k * (4 + 2)
            fused = time_ms(lambda: tk.act_quant(x, out_dtype=torch.float16))
            eager = time_ms(lambda: quant.act_quant_ref(x).half())
            gbs, gbs_eager = nbytes / fused / 1e6, nbytes / eager / 1e6
            print(f"{preset_name:<11} {k:>6} {fused * 1e3:9.1f} {gbs:7.0f} {percent(gbs * 1e9, peak_bw):>6} "
                  f"{eager * 1e3:9.1f} {gbs_eager:7.0f} {eager / fused:6.1f}x")
            rows.append(dict(kind="activation", preset=preset_name, tokens=tokens, k=k, fused_us=fused * 1e3,
                             fused_gbs=gbs, eager_us=eager * 1e3, eager_gbs=gbs_eager,
                             fused_pct_peak=(100 * gbs * 1e9 / peak_bw) if peak_bw else None))
    return rows


# ---------------------------------------------------------------------------------------------
# 3. training step

# --modes name -> (label, QAT on, eager reference quantizers)
TRAIN_MODES = {"fp16": ("fp16 linears (no QAT)", False, False), "triton": ("QAT, Triton kernels", True, False),
               "reference": ("QAT, eager reference", True, True)}


def bench_train(args, peak_flops: float | None) -> list[dict]:
    from tqdm import tqdm

    from nanochat import quant
    from nanochat.config import preset
    from nanochat.model import GPT

    config = preset(args.train_preset, max_seq_len=max(args.seq_len, preset(args.train_preset).max_seq_len))
    torch.manual_seed(0)
    model = GPT(config).to(DEVICE)
    runner = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE == "cuda")
    scaler = torch.amp.GradScaler(DEVICE)
    idx = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=DEVICE)
    targets = torch.roll(idx, -1, dims=1)
    tokens_per_step = args.batch_size * args.seq_len
    flops_per_token = model.flops_per_token(args.seq_len)

    def step() -> float:
        with torch.autocast(DEVICE, dtype=torch.float16):
            _, loss = runner(idx, targets)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    modes = [TRAIN_MODES[name] for name in args.modes.split(",")]
    rows = []
    print(f"\ntraining step: {args.train_preset} ({model.num_params() / 1e6:.0f}M params), batch {args.batch_size} x "
          f"{args.seq_len} tokens, fp16 autocast, fused AdamW{', torch.compile' if args.compile else ''}")
    for label, quantize, reference in modes:
        model.set_quantization(quantize)
        quant.force_reference(reference)
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in tqdm(range(args.steps), desc=label, leave=False):
            loss = step()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        tok_s = tokens_per_step / seconds
        mfu = flops_per_token * tok_s / peak_flops if peak_flops else None
        rows.append(dict(kind="train", mode=label, step_ms=seconds * 1e3, tokens_per_s=tok_s, mfu=mfu,
                         loss=float(loss.detach()), batch_size=args.batch_size, seq_len=args.seq_len))
    quant.force_reference(False)
    base = rows[0]["step_ms"]
    print(f"{'mode':<24} {'step ms':>8} {'tokens/s':>10} {'MFU':>6} {'vs fp16':>8}")
    for r in rows:
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "    ?"
        r["overhead_vs_fp16"] = r["step_ms"] / base - 1
        print(f"{r['mode']:<24} {r['step_ms']:8.1f} {r['tokens_per_s']:10.0f} {mfu:>6} {100 * r['overhead_vs_fp16']:+7.1f}%")
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to run
    parser.add_argument("--presets", default="nano-125m,medium-3b", help="comma-separated presets whose weight shapes are timed")
    parser.add_argument("--skip-kernels", action="store_true", help="skip the kernel bandwidth tables")
    parser.add_argument("--skip-train", action="store_true", help="skip the training-step benchmark")
    # kernel sizes
    parser.add_argument("--act-tokens", type=int, default=16384, help="tokens (rows) for the activation kernel")
    # training step
    parser.add_argument("--train-preset", default="nano-125m", help="preset of the training-step benchmark")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per mode")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--modes", default="fp16,triton,reference",
                        help=f"training-step modes to time, in order, from {list(TRAIN_MODES)} (the first is the overhead baseline)")
    # device
    parser.add_argument("--peak-gbs", type=float, default=-1, help="peak memory bandwidth in GB/s (-1: from the device name)")
    parser.add_argument("--peak-tflops", type=float, default=-1, help="peak fp16 dense TFLOP/s (-1: from the device name)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    unknown = [m for m in args.modes.split(",") if m not in TRAIN_MODES]
    if unknown:
        parser.error(f"--modes: unknown mode(s) {unknown}; choose from {list(TRAIN_MODES)}")

    if not torch.cuda.is_available():
        sys.exit("bench_triton: needs a CUDA GPU, and torch.cuda.is_available() is False; "
                 "refusing to fall back to the CPU (the kernel tests run on CPU: tests/test_triton_kernels.py)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("bench_triton: TRITON_INTERPRET is set, so the kernels would be interpreted on the host; unset it")

    name = torch.cuda.get_device_name()
    peak_bw, peak_flops = device_peaks(name)
    peak_bw = args.peak_gbs * 1e9 if args.peak_gbs > 0 else peak_bw
    peak_flops = args.peak_tflops * 1e12 if args.peak_tflops > 0 else peak_flops
    print(f"device: {name}; peak bandwidth {peak_bw and peak_bw / 1e12} TB/s, peak fp16 {peak_flops and peak_flops / 1e12} TFLOP/s"
          + ("" if peak_bw else " (unknown device: pass --peak-gbs / --peak-tflops for percentages)"))
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]

    rows = []
    check_exact(presets)
    if not args.skip_kernels:
        rows += bench_weight_kernels(presets, peak_bw)
        rows += bench_act_kernels(presets, args.act_tokens, peak_bw)
    if not args.skip_train:
        rows += bench_train(args, peak_flops)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(device=name, rows=rows), indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
