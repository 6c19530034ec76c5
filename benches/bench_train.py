"""Training-step throughput: tokens/s and MFU of one preset on one device and precision, with the
ternary/int8 fake quantization on (QAT, what training runs) and off (plain linears, the baseline).

Random tokens, the real model and optimizers (Muon + AdamW), forward + backward + step, timed after
warm-up steps. A request for CUDA without a GPU is an error, never a silent CPU run.

    .venv/bin/python benches/bench_train.py                                   # tiny, CPU, fp32
    .venv/bin/python benches/bench_train.py --preset nano-125m --device cuda --precision bf16 --batch-size 16 --seq-len 1024
    .venv/bin/python benches/bench_train.py --preset nano-125m --device cuda --precision fp16 --compile
    .venv/bin/python benches/bench_train.py --breakdown --no-plain          # + where a CPU step goes
    .venv/bin/python benches/bench_train.py --preset nano-125m --device cuda --precision fp16 --batch-size 16 \
        --seq-len 2048 --no-plain --profile 2 --trace runs/train_step.json.gz   # + where a GPU step goes

CPU ms are process CPU time (all threads): on a shared machine they show the work a step costs
even when other jobs stretch its wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py does: spinning OpenMP waits starve shared cores

import torch  # noqa: E402

from nanochat import mhc, quant  # noqa: E402
from nanochat.config import PRESETS, preset  # noqa: E402
from nanochat.model import GPT  # noqa: E402
from nanochat.optim import build_optimizers  # noqa: E402
from nanochat.train import accumulate_gradients, autocast_context, device_peak_flops, optimizer_step  # noqa: E402


def random_batch(vocab: int, batch_size: int, seq_len: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of random token ids [batch_size, seq_len]."""
    return (torch.randint(0, vocab, (batch_size, seq_len), device=device),
            torch.randint(0, vocab, (batch_size, seq_len), device=device))


def bench(model, optimizers, scaler, device: str, precision: str, batch_size: int, seq_len: int,
          warmup: int, steps: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per optimizer step (means over `steps` after `warmup`)."""
    vocab = model.config.vocab_size
    autocast = autocast_context(device, precision)
    batches = [random_batch(vocab, batch_size, seq_len, device) for _ in range(4)]
    for i in range(warmup + steps):
        if i == warmup:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
        accumulate_gradients(model, [batches[i % len(batches)]], autocast, scaler)
        optimizer_step(model, optimizers, scaler, grad_clip=1.0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


class PartTimer:
    """Accumulates wall and CPU seconds per named part of a step."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def add(self, name: str, wall: float, cpu: float) -> None:
        self.wall[name] = self.wall.get(name, 0.0) + wall
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu

    @contextlib.contextmanager
    def part(self, name: str):
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        self.add(name, time.perf_counter() - t0, time.process_time() - c0)

    def timed(self, name: str, fn):
        """fn wrapped so that each call adds its time to `name`."""
        def wrapper(*args, **kwargs):
            with self.part(name):
                return fn(*args, **kwargs)
        return wrapper


def breakdown(model, optimizers, device: str, batch_size: int, seq_len: int, warmup: int, steps: int) -> None:
    """Print where a CPU fp32 step goes: forward (and within it the two quantizers), backward,
    gradient clipping, each optimizer. Synchronous CPU timing; not meaningful on CUDA."""
    vocab = model.config.vocab_size
    x, y = random_batch(vocab, batch_size, seq_len, device)
    timer = PartTimer()
    originals = quant.quantize_weight, quant.quantize_activation
    # the model looks these up in quant at every call, so wrapping them times them inside the forward
    quant.quantize_weight = timer.timed("  weight quant (in fwd)", quant.quantize_weight)
    quant.quantize_activation = timer.timed("  act quant (in fwd)", quant.quantize_activation)
    try:
        for i in range(warmup + steps):
            if i == warmup:
                timer.wall.clear()
                timer.cpu.clear()
            with timer.part("forward"):
                _, loss = model(x, y)
                loss.item()
            with timer.part("backward"):
                loss.backward()
            with timer.part("grad clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
            for opt in optimizers:
                with timer.part(f"{type(opt).__name__} step"):
                    opt.step()
                opt.zero_grad(set_to_none=True)
    finally:
        quant.quantize_weight, quant.quantize_activation = originals
    total_wall = sum(v for k, v in timer.wall.items() if not k.startswith(" "))
    total_cpu = sum(v for k, v in timer.cpu.items() if not k.startswith(" "))
    print(f"  breakdown over {steps} steps (ms per step; share of the step's CPU time):")
    order = ["forward", "  weight quant (in fwd)", "  act quant (in fwd)", "backward", "grad clip"]
    order += [k for k in timer.cpu if k not in order]
    for name in order:
        if name in timer.cpu:
            print(f"    {name:24s} wall {timer.wall[name] / steps * 1000:8.1f}  cpu {timer.cpu[name] / steps * 1000:8.1f}"
                  f"  {100 * timer.cpu[name] / total_cpu:5.1f}%")
    print(f"    {'total':24s} wall {total_wall / steps * 1000:8.1f}  cpu {total_cpu / steps * 1000:8.1f}"
          f"  -> {batch_size * seq_len * steps / total_wall:,.0f} tok/s wall")


def profile_steps(model, optimizers, scaler, device: str, precision: str, batch_size: int, seq_len: int,
                  steps: int, trace: str | None, rows: int = 30) -> None:
    """torch.profiler over `steps` training steps: the ops and kernels that take the device's time
    (self time, so nothing is counted twice), then each GPU kernel's share of the device time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    vocab = model.config.vocab_size
    autocast = autocast_context(device, precision)
    batch = random_batch(vocab, batch_size, seq_len, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            accumulate_gradients(model, [batch], autocast, scaler)
            optimizer_step(model, optimizers, scaler, grad_clip=1.0)
        if cuda:
            torch.cuda.synchronize()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"  profile of {steps} steps, sorted by {sort}:")
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=70))
    if cuda:  # device kernels only, grouped by a short name: where the GPU's time goes
        kernels: dict[str, float] = {}
        for e in prof.events():
            # a kernel or copy on the device: its own duration; the optimizers' and compiled graphs'
            # record_function ranges are mirrored on the GPU timeline too, and would count twice
            if e.device_type.name == "CUDA" and not e.name.startswith(("Optimizer.", "## ")):
                kernels[e.name[:90]] = kernels.get(e.name[:90], 0.0) + e.time_range.elapsed_us()
        total = sum(kernels.values())
        print(f"  GPU kernels: {total / 1e3 / steps:.1f} ms per step in {len(kernels)} kernels; the top {rows}:")
        for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:rows]:
            print(f"    {us / 1e3 / steps:8.2f} ms {100 * us / total:5.1f}%  {name}")
    if trace:
        prof.export_chrome_trace(trace)
        print(f"  wrote {trace} (chrome://tracing or https://ui.perfetto.dev)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="autocast dtype")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    p.add_argument("--no-plain", action="store_true", help="skip the plain-linear (quantization off) baseline")
    p.add_argument("--reference-mix", action="store_true",
                   help="mix mHC streams with the PyTorch broadcast form even on CUDA (not the Triton kernel)")
    p.add_argument("--breakdown", action="store_true", help="also time forward/quantizers/backward/optimizers of QAT (CPU)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS", help="also run torch.profiler over this many QAT steps")
    p.add_argument("--trace", default=None, help="with --profile: write the Chrome trace here (.json or .json.gz)")
    args = p.parse_args()

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device} requested but torch sees no CUDA device; not falling back to CPU", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    config = preset(args.preset)
    if args.seq_len > config.max_seq_len:
        print(f"error: --seq-len {args.seq_len} > max_seq_len {config.max_seq_len} of {args.preset}", file=sys.stderr)
        return 2
    mhc.force_reference(args.reference_mix)
    torch.manual_seed(0)
    model = GPT(config).to(args.device)
    train_model = torch.compile(model) if args.compile else model
    optimizers = build_optimizers(model)
    scaler = torch.amp.GradScaler(args.device.split(":")[0], enabled=args.precision == "fp16")
    where = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else \
        f"CPU, {args.threads} threads ({os.cpu_count()} cores visible)"
    print(f"{args.preset}: {model.num_params():,} params | {where} | {args.precision} | batch {args.batch_size} x {args.seq_len}")

    peak = device_peak_flops(args.device, args.precision)
    flops_per_token = model.flops_per_token(args.seq_len)
    modes = [("QAT (ternary w, int8 act)", True)] + ([] if args.no_plain else [("plain linears", False)])
    for name, quantize in modes:
        model.set_quantization(quantize)
        sec, cpu_sec = bench(train_model, optimizers, scaler, args.device, args.precision, args.batch_size,
                             args.seq_len, args.warmup, args.steps)
        tok_s = args.batch_size * args.seq_len / sec
        mfu = f"{100 * tok_s * flops_per_token / peak:.1f}%" if peak else "n/a"
        mem = f" | peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if args.device.startswith("cuda") else ""
        cpu = f"  {cpu_sec * 1000:9.1f} CPU ms/step" if not args.device.startswith("cuda") else ""
        print(f"  {name:28s} {sec * 1000:9.1f} ms/step  {tok_s:12,.0f} tok/s  MFU {mfu}{cpu}{mem}")
        if quantize and args.breakdown and not args.device.startswith("cuda") and args.precision == "fp32":
            breakdown(model, optimizers, args.device, args.batch_size, args.seq_len, 1, args.steps)
        if quantize and args.profile:
            profile_steps(train_model, optimizers, scaler, args.device, args.precision, args.batch_size, args.seq_len,
                          args.profile, args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
