"""Engine speed on this CPU: decode, prefill, batched decoding, and PyTorch fp32 in the same run.

    .venv/bin/python benches/bench_engine.py                       # random-init nano-125m, exported to a temp dir
    .venv/bin/python benches/bench_engine.py --model model.gguf    # an existing export
    .venv/bin/python benches/bench_engine.py --preset tiny --decode-tokens 64

Prints: file size, decode tokens/s for one sequence (and the share of decode time spent inside the
Rust kernel calls), prefill tokens/s for a 512-token prompt, decode tokens/s of 1 and 8 sequences at
1024 cached positions (--long-context), aggregate tokens/s with 8 concurrent
sequences through the Scheduler vs 1, and the same model's decode speed in PyTorch fp32 (KV-cached
greedy loop) with the ratio. Targets (nano-125m, 2 cores): decode >= 300 tok/s, prefill >= 1000 tok/s,
8-seq aggregate >= 3x single, engine >= 8x PyTorch fp32.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from nanochat.config import preset  # noqa: E402
from nanochat.engine import Engine, SamplingParams, Scheduler  # noqa: E402
from nanochat.engine import kernels  # noqa: E402


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------------------
# Building a random-init model and its export


def build_export(preset_name: str, folder: Path, ternary: str = "tq2_0") -> tuple[Path, torch.nn.Module]:
    from nanochat.export import export_gguf
    from nanochat.model import GPT
    from nanochat.tokenizer import Tokenizer

    cfg = preset(preset_name)
    text = "\n".join(p.read_text() for p in sorted((Path(__file__).parents[1] / "python" / "nanochat").glob("*.py")))
    tok = Tokenizer.train([text], cfg.vocab_size)  # pads with filler tokens up to vocab_size
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    t0 = time.perf_counter()
    path = export_gguf(model, cfg, tok, folder / "model.gguf", ternary=ternary)
    print(f"export: {time.perf_counter() - t0:.1f} s")
    return path, model


# ---------------------------------------------------------------------------------------------
# Kernel timing: wrap every matrix so each gemv/gemm call is timed


class Timed:
    """A matrix whose gemv/gemm calls add their wall time to `Timed.by_part[part]`."""
    by_part: dict[str, float] = {}

    def __init__(self, mat, part: str):
        self.mat, self.part = mat, part

    def gemv(self, x):
        t0 = time.perf_counter()
        y = self.mat.gemv(x)
        Timed.by_part[self.part] = Timed.by_part.get(self.part, 0.0) + time.perf_counter() - t0
        return y

    def gemv_dynamic(self, x):
        t0 = time.perf_counter()
        y = self.mat.gemv_dynamic(x)
        Timed.by_part[self.part] = Timed.by_part.get(self.part, 0.0) + time.perf_counter() - t0
        return y

    def gemm_dynamic(self, x):
        t0 = time.perf_counter()
        y = self.mat.gemm_dynamic(x)
        Timed.by_part[self.part] = Timed.by_part.get(self.part, 0.0) + time.perf_counter() - t0
        return y

    def gemm(self, x):
        t0 = time.perf_counter()
        y = self.mat.gemm(x)
        Timed.by_part[self.part] = Timed.by_part.get(self.part, 0.0) + time.perf_counter() - t0
        return y


class PinnedSchedule:
    """A matrix whose *_dynamic calls take the pool's fixed per-thread split (the engine before ops.rs), for A/B runs."""

    def __init__(self, mat):
        self.mat = mat
        self.gemv = self.gemv_dynamic = mat.gemv
        self.gemm = self.gemm_dynamic = mat.gemm


def use_pinned_schedule(engine: Engine) -> None:
    engine.model.decoder = None  # the native decode step schedules its matmuls dynamically: use the Python loop
    w = engine.model.w
    for layer in w.layers:
        layer.qkv, layer.o = PinnedSchedule(layer.qkv), PinnedSchedule(layer.o)
        layer.gate_up, layer.down = PinnedSchedule(layer.gate_up), PinnedSchedule(layer.down)
    w.head = PinnedSchedule(w.head)


def set_timed(engine: Engine, on: bool) -> None:
    w = engine.model.w
    unwrap = lambda m: m.mat if isinstance(m, Timed) else m  # noqa: E731
    wrap = (lambda m, part: Timed(unwrap(m), part)) if on else (lambda m, part: unwrap(m))
    for layer in w.layers:
        layer.qkv, layer.o = wrap(layer.qkv, "qkv"), wrap(layer.o, "o")
        layer.gate_up, layer.down = wrap(layer.gate_up, "gate_up"), wrap(layer.down, "down")
    w.head = wrap(w.head, "head (int8)")


# ---------------------------------------------------------------------------------------------
# Engine measurements


def decode_speed(engine: Engine, prompt: list[int], n: int) -> tuple[float, dict[str, float]]:
    """(tokens/s of decode steps after a prefill, ms per token in each native stage and outside them).
    The native decode step (decode.rs) times its own stages; the Python layer loop is timed by wrapping
    each matrix's kernel calls. "python" is the rest of the wall time: Python, numpy and call overhead."""
    model = engine.model
    cache = model.new_cache(len(prompt) + n + 1)
    logits = model.forward([(prompt, cache)])
    token = int(np.argmax(logits[0]))
    native = model.decoder is not None
    if native:
        model.decoder.reset_times()
    else:
        set_timed(engine, True)
        Timed.by_part = {}
    t0 = time.perf_counter()
    for _ in range(n):
        logits = model.forward([([token], cache)])
        token = int(np.argmax(logits[0]))
    elapsed = time.perf_counter() - t0
    if native:
        parts = {k: v / n * 1e3 for k, v in model.decoder.times()}
    else:
        set_timed(engine, False)
        parts = {k: v / n * 1e3 for k, v in Timed.by_part.items()}
    parts["python (outside native code)" if native else "python (outside kernels)"] = elapsed / n * 1e3 - sum(parts.values())
    return n / elapsed, parts


def long_context_speed(engine: Engine, prompt: list[int], batches: list[int], n: int) -> dict[int, float]:
    """Decode tokens/s of B sequences (each B in batches) whose caches already hold len(prompt) positions:
    one prefill, its KV cache copied to every sequence, then n greedy decode steps of all B at once."""
    model = engine.model
    first = model.new_cache(len(prompt) + n + 1)
    logits = model.forward([(prompt, first)])
    out = {}
    for b in batches:
        caches = []
        for _ in range(b):
            c = model.new_cache(first.capacity)
            c.k[...], c.v[...], c.length = first.k, first.v, first.length
            caches.append(c)
        tokens = [int(np.argmax(logits[0]))] * b
        t0 = time.perf_counter()
        for _ in range(n):
            step = model.forward([([t], c) for t, c in zip(tokens, caches)])
            tokens = [int(t) for t in step.argmax(-1)]
        out[b] = b * n / (time.perf_counter() - t0)
    return out


def prefill_speed(engine: Engine, prompt: list[int], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        cache = engine.model.new_cache(len(prompt))
        t0 = time.perf_counter()
        engine.model.forward([(prompt, cache)])
        best = min(best, time.perf_counter() - t0)
    return len(prompt) / best


def scheduler_speed(engine: Engine, prompts: list[list[int]], n: int, temperature: float = 0.0) -> tuple[float, float]:
    """(aggregate generated tokens/s of len(prompts) concurrent requests of n tokens each, share of that wall time
    spent in the model's forward passes; the rest is sampling, streaming and the scheduler loop)."""
    sched = Scheduler(engine, max_batch=len(prompts), max_queue=len(prompts))
    model, in_forward = engine.model, [0.0]

    def timed_forward(seqs, all_logits=False):
        t0 = time.perf_counter()
        out = type(model).forward(model, seqs, all_logits)
        in_forward[0] += time.perf_counter() - t0
        return out
    model.forward = timed_forward  # an instance attribute shadows the method for this run only
    try:
        t0 = time.perf_counter()
        reqs = [sched.submit(p, SamplingParams(temperature=temperature, max_tokens=n, seed=i))
                for i, p in enumerate(prompts)]
        count = sum(len(list(r)) for r in reqs)
        elapsed = time.perf_counter() - t0
        return count / elapsed, in_forward[0] / elapsed
    finally:
        sched.close()
        del model.forward


def scheduler_speeds(engine: Engine, prompt: list[int], sizes: list[int], n: int, temperature: float,
                     rng: np.random.Generator, rounds: int) -> dict[int, tuple[float, float]]:
    """scheduler_speed for 1 and each batch size, best of `rounds` rounds, interleaved: the machine is shared and its
    load drifts, and a run that was not slowed by another tenant is the one that measures the engine."""
    vocab = engine.config.vocab_size
    prompts = {b: [prompt] if b == 1 else [[int(t) for t in rng.integers(4, vocab, 16)] for _ in range(b)]
               for b in sorted({1, *sizes})}
    best: dict[int, tuple[float, float]] = {}
    for _ in range(rounds):
        for b, ps in prompts.items():
            speed = scheduler_speed(engine, ps, n, temperature)
            best[b] = max(best.get(b, (0.0, 0.0)), speed)
    return best


# ---------------------------------------------------------------------------------------------
# PyTorch fp32 baseline: the same weights, quantization off, greedy decoding with a KV cache


@torch.no_grad()
def torch_decode_speed(model: torch.nn.Module, prompt: list[int], n: int) -> float:
    from nanochat.model import apply_rope

    model.set_quantization(False)  # plain fp32 linears: what a non-ternary CPU runtime would do
    cfg = model.config
    hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    caches = [([], []) for _ in model.blocks]

    def step(ids: torch.Tensor, pos: int) -> torch.Tensor:
        t = ids.shape[1]
        cos, sin = model.rope_cos[pos:pos + t], model.rope_sin[pos:pos + t]
        xs = model.tok_emb(ids)
        xs = xs if cfg.mhc_streams == 1 else xs.unsqueeze(0).expand(cfg.mhc_streams, *xs.shape)
        for block, (ks, vs) in zip(model.blocks, caches):
            u = block.attn_norm(block.attn_mhc.read(xs))
            a = block.attn
            q = apply_rope(a.q(u).view(1, t, nh, hd).transpose(1, 2), cos, sin)
            k = apply_rope(a.k(u).view(1, t, nkv, hd).transpose(1, 2), cos, sin)
            ks.append(k)
            vs.append(a.v(u).view(1, t, nkv, hd).transpose(1, 2))
            kk = torch.cat(ks, 2).repeat_interleave(nh // nkv, 1)
            vv = torch.cat(vs, 2).repeat_interleave(nh // nkv, 1)
            y = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=t > 1)
            y = y.transpose(1, 2).reshape(1, t, nh * hd)
            y = a.o(a.sub_norm(y) if a.sub_norm is not None else y)
            xs = block.attn_mhc.write(xs, y)
            xs = block.ffn_mhc.write(xs, block.ffn(block.ffn_norm(block.ffn_mhc.read(xs))))
        x = model.norm(xs if cfg.mhc_streams == 1 else xs.mean(0))
        head = model.tok_emb.weight if model.lm_head is None else model.lm_head.weight
        return x[:, -1] @ head.T

    logits = step(torch.tensor([prompt]), 0)
    pos = len(prompt)
    t0 = time.perf_counter()
    for _ in range(n):
        token = logits.argmax(-1)
        logits = step(token.view(1, 1), pos)
        pos += 1
    elapsed = time.perf_counter() - t0
    model.set_quantization(True)
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="existing .gguf (default: export a random-init --preset)")
    parser.add_argument("--preset", default="nano-125m", help="preset to build when no --model is given")
    parser.add_argument("--ternary", default="tq2_0", choices=["tq2_0", "tq1_0"], help="ternary block type of the export")
    parser.add_argument("--threads", type=int, default=-1, help="kernel threads (-1 = the kernels' default)")
    parser.add_argument("--decode-tokens", type=int, default=128, help="decode steps to time")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prompt length for prefill")
    parser.add_argument("--batch", type=int, default=8, help="concurrent sequences for the aggregate figure")
    parser.add_argument("--long-context", type=int, default=1024,
                        help="also time decoding at this many cached positions, 1 and --batch sequences (0 = skip)")
    parser.add_argument("--batch-sizes", type=lambda v: [int(b) for b in v.split(",") if b], default=[],
                        help="more concurrent-sequence counts to report through the scheduler, e.g. 2,4")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the scheduler runs (best kept)")
    parser.add_argument("--scheduler-temperature", type=float, default=0.0,
                        help="sampling temperature of the scheduler runs (0 = greedy; the server's default is 1)")
    parser.add_argument("--torch-threads", type=int, default=-1, help="PyTorch threads (-1 = all cores)")
    parser.add_argument("--skip-torch", action="store_true", help="skip the PyTorch fp32 baseline")
    parser.add_argument("--schedule", default="dynamic", choices=["dynamic", "pinned"],
                        help="kernel scheduling: work-stealing chunks (engine default) or the pool's fixed split "
                             "(pinned also turns off the native decode step)")
    parser.add_argument("--decode-path", default="native", choices=["native", "python"],
                        help="decode steps as one native call (engine default) or the Python layer loop, for A/B runs")
    args = parser.parse_args()

    print(f"cpu: {cpu_name()}, {os.cpu_count()} logical cores, kernels: {kernels.BACKEND}, schedule: {args.schedule}")
    with tempfile.TemporaryDirectory() as tmp:
        torch_model = None
        path = Path(args.model) if args.model else None
        if path is None:
            path, torch_model = build_export(args.preset, Path(tmp), args.ternary)
        size = path.stat().st_size
        print(f"model file: {size / 1e6:.1f} MB ({size / 2**20:.1f} MiB)")
        t0 = time.perf_counter()
        engine = Engine.load(path, threads=None if args.threads == -1 else args.threads)
        print(f"load: {time.perf_counter() - t0:.1f} s")
    if args.schedule == "pinned":
        use_pinned_schedule(engine)
    if args.decode_path == "python":
        engine.model.decoder = None

    rng = np.random.default_rng(0)
    vocab = engine.config.vocab_size
    prompt = [int(t) for t in rng.integers(4, vocab, 16)]
    results = {}
    decode_speed(engine, prompt, 8)  # warm-up
    results["decode"], parts = decode_speed(engine, prompt, args.decode_tokens)
    share = 1 - list(parts.values())[-1] / sum(parts.values())
    where = "the native decode step" if engine.model.decoder is not None else "kernel calls"
    print(f"decode (1 sequence): {results['decode']:.1f} tok/s; {share:.0%} of decode time inside {where}")
    print("  ms per token: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    long_prompt = [int(t) for t in rng.integers(4, vocab, min(args.prefill_tokens, engine.max_seq_len))]
    results["prefill"] = prefill_speed(engine, long_prompt, repeats=2)
    print(f"prefill ({len(long_prompt)} tokens): {results['prefill']:.1f} tok/s")
    if args.long_context > 0:
        ctx = min(args.long_context, engine.max_seq_len - 40)
        long = long_context_speed(engine, [int(t) for t in rng.integers(4, vocab, ctx)], [1, args.batch], 32)
        print(f"decode at {ctx} cached positions: 1 sequence {long[1]:.1f} tok/s, "
              f"{args.batch} sequences {long[args.batch]:.1f} tok/s")
    n = max(16, args.decode_tokens)  # tokens per request: with 64 the 8 prompts' prefill took 15-20% of the 8-seq run
    sizes = sorted({args.batch, *args.batch_sizes})
    speeds = scheduler_speeds(engine, prompt, sizes, n, args.scheduler_temperature, rng, args.rounds)
    one = speeds[1][0]
    print(f"scheduler aggregate ({n} tokens per request, best of {args.rounds} rounds): 1 sequence {one:.1f} tok/s, {args.batch} sequences {speeds[args.batch][0]:.1f} tok/s "
          f"({speeds[args.batch][0] / one:.2f}x)")
    print("  by batch size (tok/s, x single, share of time in forward passes): " + ", ".join(
        f"{b}: {tps:.1f} ({tps / one:.2f}x, {share:.0%})" for b, (tps, share) in speeds.items()))
    if torch_model is None and not args.skip_torch:
        print("(PyTorch baseline needs the model: run without --model to build one)")
    elif torch_model is not None and not args.skip_torch:
        torch.set_num_threads(args.torch_threads if args.torch_threads > 0 else (os.cpu_count() or 1))
        tps = torch_decode_speed(torch_model, prompt, max(16, args.decode_tokens // 4))
        print(f"PyTorch fp32 decode (KV cache, {torch.get_num_threads()} threads): {tps:.1f} tok/s; "
              f"engine is {results['decode'] / tps:.1f}x faster")


if __name__ == "__main__":
    main()
