"""Train a ternary GPT (quantization-aware) and write a run folder: checkpoints, metrics, loss plot.

The default job (no flags): the `tiny` preset on the built-in corpus (the Python standard library's
own sources) for as many steps as fit --time-budget (570 s, measured by a short probe), about 10
minutes on 2 CPU cores, validation loss going clearly down:
    .venv/bin/python -m nanochat.train
One GPU, nano-125m in bf16:
    .venv/bin/python -m nanochat.train --preset nano-125m --device cuda --precision bf16 --steps 5000
Several GPUs (or CPU processes, with the gloo backend):
    .venv/bin/torchrun --nproc_per_node 8 -m nanochat.train --preset nano-125m
A tiny smoke run on CPU:
    .venv/bin/python -m nanochat.train --steps 20 --batch-size 2 --seq-len 64 --dim 128 --n-layers 2
Continue a run exactly where it stopped (same data position, RNG, optimizer and scaler state):
    .venv/bin/python -m nanochat.train --out runs/tiny --resume

Loop: Muon (block matrices) + AdamW (the rest), warmup-stable-decay LR, gradient accumulation
(loss / accum, so B x K gives the gradient of one batch of B*K), gradient clipping, autocast
fp16 (dynamic loss scaling, skipped steps counted) / bf16 / fp32 with fp32 master weights,
DistributedDataParallel under torchrun.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import resource
import sys
import time
from pathlib import Path

# OpenMP threads that spin at barriers starve each other on shared cores (measured 6x slower on the
# loaded 2-core dev box); sleeping waits cost little. Only effective before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nanochat import checkpoint  # noqa: E402
from nanochat.checkpoint import CheckpointError  # noqa: E402
from nanochat.config import PRESETS, ConfigError, ModelConfig, preset  # noqa: E402
from nanochat.corpus import DataError  # noqa: E402
from nanochat.distributed import DistInfo, all_reduce_mean, barrier, cleanup_distributed, setup_distributed  # noqa: E402
from nanochat.metrics import MetricsLogger  # noqa: E402
from nanochat.optim import CPU_BF16_MATMUL  # noqa: E402
from nanochat.cli_args import non_negative_int, positive_float, positive_int  # noqa: E402

EVALS_PER_RUN = 8  # default eval interval: this many evals over the run (plus the one at step 0)
# Dense fp16/bf16 tensor-core peak per device (TFLOPS), for MFU; fp32 runs count TF32 at half of it.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
               "A10": 125.0, "4090": 165.0, "3090": 71.0}

MODEL_FLAG_HELP = {
    "vocab_size": "tokenizer / embedding size",
    "dim": "model width",
    "n_layers": "number of transformer blocks",
    "n_heads": "query heads",
    "n_kv_heads": "key/value heads (grouped-query attention)",
    "ffn_mult": "FFN hidden size = dim * ffn_mult (rounded up to group_size)",
    "max_seq_len": "longest sequence the model supports (RoPE table)",
    "group_size": "ternary weights share one scale per group of this many input weights",
    "weight_quant": "group scale: absmean (BitNet b1.58) or absmax",
    "activation_bits": "int8 fake-quant of BitLinear inputs: 8, or 0 for off",
    "mhc_streams": "hyper-connection residual streams: 1 (plain), 2 or 4",
    "sub_norms": "RMSNorm before o-proj and down-proj (BitNet b1.58 style)",
    "tie_embeddings": "output head shares the token embedding",
    "rope_theta": "RoPE base",
    "norm_eps": "RMSNorm epsilon",
}


# ---------------------------------------------------------------------------------------------
# Command line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None/False or the help text already explains it."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nanochat.train",
        description="Train a ternary-weight GPT with quantization-aware training.",
        formatter_class=HelpFormatter,
    )
    # model
    p.add_argument("--preset", default="tiny", help=f"model preset, one of {sorted(PRESETS)}")
    # device and precision
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="autocast dtype; auto = bf16 on GPUs that support it, else fp16 on GPU; on CPU bf16 where "
                        "it multiplies bf16 in hardware (AVX512-BF16, AMX), else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only; ignored on CPU)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: the usable core count)")
    # data and output
    p.add_argument("--data", default=None,
                   help="corpus: a directory or file (.py/.txt/.md/..., .jsonl with 'text', .parquet with 'text') "
                        "or hf:NAME for a Hugging Face dataset; default: the Python standard library's .py sources")
    p.add_argument("--out", default=None, help="run folder (default: runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest/ checkpoint")
    p.add_argument("--seed", type=int, default=1337, help="seed for init, data order and sampling")
    # run length and batch shape
    p.add_argument("--steps", type=positive_int, default=None,
                   help="optimizer steps (default: as many as fit --time-budget, from a short throughput probe)")
    p.add_argument("--time-budget", type=positive_float, default=570.0,
                   help="seconds for the whole job when --steps is not given (data, evals and checkpoints included)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="micro-batch size (sequences per forward, per process)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches accumulated per optimizer step")
    p.add_argument("--seq-len", type=positive_int, default=256, help="training window length (<= the preset's max_seq_len)")
    # optimization
    p.add_argument("--lr", type=positive_float, default=1.0,
                   help="multiplier on every optimizer's base LR (Muon and AdamW have their own base LRs in optim.py)")
    p.add_argument("--warmup-steps", type=non_negative_int, default=None, help="LR warmup steps (default: 2%% of --steps, at least 1)")
    p.add_argument("--decay-frac", type=float, default=0.2, help="fraction of steps in the final linear LR decay (WSD)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this; -1 (or 0) = off")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay of the Muon block matrices and of the AdamW embedding and head (not norms or mHC)")
    # curriculum
    p.add_argument("--curriculum", action="store_true",
                   help="sequence-length warmup: windows grow from --curriculum-min-len to --seq-len, tokens per step held steady")
    p.add_argument("--curriculum-steps", type=positive_int, default=None, help="steps of the length warmup (default: 30%% of --steps)")
    p.add_argument("--curriculum-min-len", type=positive_int, default=64, help="first window length of the curriculum")
    # logging, evaluation, checkpoints
    p.add_argument("--log-interval", type=positive_int, default=10, help="steps between train log lines")
    p.add_argument("--eval-interval", type=int, default=None,
                   help=f"steps between validation evals (default: --steps / {EVALS_PER_RUN}); -1 = only at the end")
    p.add_argument("--eval-tokens", type=positive_int, default=16384, help="held-out tokens per validation eval (the same first windows each time)")
    p.add_argument("--checkpoint-interval", type=int, default=None,
                   help="steps between latest/ checkpoints (default: --steps / 4); -1 = only at the end")
    p.add_argument("--humaneval-at-end", type=non_negative_int, default=0, metavar="K",
                   help="after training, run HumanEval with K samples per problem (needs nanochat.eval); 0 = off")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines only)")
    # model overrides: every ModelConfig field, e.g. --dim 128 --mhc-streams 1 --no-sub-norms
    group = p.add_argument_group("model overrides (default: the preset's value)")
    for f in dataclasses.fields(ModelConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=MODEL_FLAG_HELP.get(f.name))
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            group.add_argument(flag, type=kind, default=None, help=MODEL_FLAG_HELP.get(f.name))
    return p


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    """The preset with the CLI overrides applied; raises ConfigError on a bad value."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig) if getattr(args, f.name) is not None}
    return preset(args.preset, **overrides)


def check_args(args: argparse.Namespace, config: ModelConfig) -> None:
    """Cross-field checks argparse cannot do; ConfigError names the flag."""
    if args.seq_len > config.max_seq_len:
        raise ConfigError(f"--seq-len: expected <= max_seq_len={config.max_seq_len} of preset '{args.preset}', got {args.seq_len}")
    if args.curriculum and args.curriculum_min_len > args.seq_len:
        raise ConfigError(f"--curriculum-min-len: expected <= --seq-len={args.seq_len}, got {args.curriculum_min_len}")
    if not 0.0 <= args.decay_frac <= 1.0:
        raise ConfigError(f"--decay-frac: expected a fraction in [0, 1], got {args.decay_frac}")
    if args.eval_interval is not None and (args.eval_interval == 0 or args.eval_interval < -1):
        raise ConfigError(f"--eval-interval: expected a positive step count or -1 (off), got {args.eval_interval}")
    if args.checkpoint_interval is not None and (args.checkpoint_interval == 0 or args.checkpoint_interval < -1):
        raise ConfigError(f"--checkpoint-interval: expected a positive step count or -1 (off), got {args.checkpoint_interval}")
    if args.resume:
        latest = Path(args.out) / "latest"
        if not latest.exists() and not (Path(args.out) / ".latest.old").exists():
            raise ConfigError(f"--resume: no checkpoint to resume from, expected {latest}/")


# ---------------------------------------------------------------------------------------------
# Device, precision, throughput accounting

def pick_device(requested: str | None) -> str:
    if requested is None:
        if torch.cuda.is_available():
            print(f"device: cuda ({torch.cuda.get_device_name(0)} found; --device cpu to override)")
            return "cuda"
        print("device: cpu (no CUDA device visible to torch)")
        return "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device: {requested} requested but torch sees no CUDA device")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise ConfigError(f"--device: expected cpu, cuda or cuda:N, got {requested}")
    return requested


def pick_precision(requested: str, device: str) -> str:
    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            print("precision: bf16 (GPU supports it; no loss scaling needed)")
            return "bf16"
        print("precision: fp16 with dynamic loss scaling (GPU lacks bf16)")
        return "fp16"
    if CPU_BF16_MATMUL:  # Zen 4 default job: 870 steps in the time budget vs 665 in fp32, bpb 1.515 vs 1.576
        print("precision: bf16 (this CPU multiplies bf16 in hardware: ~25-30% faster steps than fp32)")
        return "bf16"
    print("precision: fp32 (this CPU has no bf16 matmul: emulated half precision is slower than fp32)")
    return "fp32"


def autocast_context(device: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def device_peak_flops(device: str, precision: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12 * (0.5 if precision == "fp32" else 1.0)
    return None


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------
# One optimizer step: accumulate, unscale, clip, step (or skip)

def accumulate_gradients(model, micro_batches, autocast_ctx, scaler, no_sync=None) -> float:
    """Forward/backward over the micro-batches with loss / K each, so the summed gradient equals
    that of one batch made of all of them; returns the mean loss. no_sync: DDP's, skips all-reduce
    on all but the last micro-batch."""
    k = len(micro_batches)
    total = 0.0
    for i, (x, y) in enumerate(micro_batches):
        sync = no_sync is None or i == k - 1
        with (contextlib.nullcontext() if sync else no_sync()):
            with autocast_ctx:
                _, loss = model(x, y)
            scaler.scale(loss / k).backward()
        total += loss.item()
    return total / k


def optimizer_step(model, optimizers, scaler, grad_clip: float) -> tuple[float, bool]:
    """Unscale, clip, step every optimizer, update the loss scale; returns (grad norm, skipped).

    A non-finite gradient skips the step of *all* optimizers (GradScaler alone would skip only the
    optimizer whose parameters overflowed) and, in fp16, halves the loss scale.
    """
    for opt in optimizers:
        scaler.unscale_(opt)
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip).item()
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params])).item()
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        for opt in optimizers:
            opt.step()
    scaler.update()  # reads the inf checks unscale_ recorded: lowers the scale after an overflow
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return grad_norm, skipped


# ---------------------------------------------------------------------------------------------
# Validation

@torch.no_grad()
def evaluate(model, val_batches, device: str, autocast_ctx, info: DistInfo,
             byte_lengths: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy per predicted held-out token, bits per byte), summed over ranks. Targets -1
    are padding. Bits per byte counts the exact UTF-8 bytes of the scored targets and leaves out
    special tokens (no bytes), as `nanochat.eval --task bpb` does, so the two agree."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # nats, tokens, nats of text targets, bytes
    for x, y in val_batches:
        x, y = x.to(device), y.to(device)
        with autocast_ctx:
            logits, _ = model(x)
        nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
        nbytes = byte_lengths.to(device)[y.clamp(min=0)].flatten() * (y.flatten() != -1)
        totals += torch.stack([nats.sum(), (y != -1).sum(), (nats * (nbytes > 0)).sum(), nbytes.sum()]).double().cpu()
    model.train(was_training)
    if info.enabled:
        totals = totals.to(device)
        torch.distributed.all_reduce(totals)
        totals = totals.cpu()
    loss_sum, count, text_nats, n_bytes = totals.tolist()
    if count == 0 or n_bytes == 0:
        raise ConfigError("validation: the held-out split gave no tokens to predict")
    return loss_sum / count, text_nats / (math.log(2) * n_bytes)


# ---------------------------------------------------------------------------------------------
# Schedules

def curriculum_plan(step: int, args) -> tuple[int, int, float]:
    """(micro-batch size, window length, data progress) at this step. Without --curriculum:
    (--batch-size, --seq-len, 1). With it, windows grow linearly from --curriculum-min-len to --seq-len
    (multiples of 8) with the batch grown to hold tokens per step steady, and the data moves from the
    shortest documents (progress 0.2: the shortest fifth of the tokens) to all of them."""
    if not args.curriculum or step >= args.curriculum_steps:
        return args.batch_size, args.seq_len, 1.0
    frac = step / args.curriculum_steps
    length = args.curriculum_min_len + frac * (args.seq_len - args.curriculum_min_len)
    seq_len = min(args.seq_len, max(args.curriculum_min_len, int(length) // 8 * 8))
    return args.batch_size * args.seq_len // seq_len, seq_len, 0.2 + 0.8 * frac


def replan_steps(args, step: int, steps_done: int, loop_seconds: float, job_seconds: float,
                 info: DistInfo, device: str) -> int | None:
    """An auto-sized run's new total from its measured pace (evals and checkpoints included), or None
    to keep it. Only while WSD is in its stable phase: the decay needs the final total, the flat
    stretch can grow or shrink freely. All ranks agree (min over ranks)."""
    def decay_start(total: int) -> int:
        return total - round(args.decay_frac * total)

    new_total = step + int((args.time_budget - job_seconds) / (loop_seconds / steps_done))
    if info.enabled:
        t = torch.tensor([new_total], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        new_total = int(t.item())
    if step >= decay_start(args.steps) or step >= decay_start(new_total) or new_total == args.steps:
        return None
    return new_total


def probe_step_seconds(config: ModelConfig, args, device: str, precision: str, info: DistInfo, steps: int = 3) -> float:
    """Seconds per optimizer step, timed on a throwaway copy of the model with random tokens (after one
    untimed step), so an auto-sized run's length is fixed before its first real step; max over ranks."""
    from nanochat.model import GPT
    from nanochat.optim import build_optimizers

    rng_state = torch.get_rng_state()  # the probe must not shift the real run's random streams
    model = GPT(config).to(device)
    optimizers = build_optimizers(model, lr=args.lr)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=precision == "fp16")
    shape = (args.batch_size, args.seq_len)
    micro = [(torch.randint(0, config.vocab_size, shape, device=device),) * 2 for _ in range(args.grad_accum)]
    autocast_ctx = autocast_context(device, precision)
    for i in range(steps + 1):
        if i == 1:
            if device.startswith("cuda"):
                torch.cuda.synchronize(torch.device(device))
            t0 = time.perf_counter()
        accumulate_gradients(model, micro, autocast_ctx, scaler)
        optimizer_step(model, optimizers, scaler, args.grad_clip)
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))
    seconds = (time.perf_counter() - t0) / steps
    torch.set_rng_state(rng_state)
    if info.enabled:
        t = torch.tensor([seconds], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        seconds = t.item()
    return seconds


# ---------------------------------------------------------------------------------------------
# The run

def train(args: argparse.Namespace, stop_at: int | None = None) -> dict:
    """Run the training job; returns a summary (losses, val losses, skipped steps, tokens/s, model).

    stop_at: stop after this step as if killed right after its checkpoint (tests of --resume).
    """
    from nanochat import data as data_lib
    from nanochat.model import GPT
    from nanochat.optim import build_optimizers, set_lr, wsd_lr

    job_t0 = time.perf_counter()
    config = model_config_from_args(args)
    args.out = args.out or os.path.join("runs", args.preset)
    check_args(args, config)
    info, device = setup_distributed(pick_device(args.device))
    precision = pick_precision(args.precision, device)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, threads // info.world_size) if device == "cpu" else threads)
    run_dir = Path(args.out)
    log = print if info.is_master else (lambda *a, **k: None)

    # data: tokenizer + token shards (rank 0 builds the cache, the others wait, then read it)
    if info.is_master:
        data = data_lib.prepare_data(args.data, run_dir, vocab_size=config.vocab_size, seed=args.seed)
    barrier(info)
    if not info.is_master:
        data = data_lib.prepare_data(args.data, run_dir, vocab_size=config.vocab_size, seed=args.seed)

    # model and optimizers (same seed on every rank: identical init; DDP also broadcasts rank 0's)
    torch.manual_seed(args.seed)
    model = GPT(config).to(device)
    log(f"model: preset {args.preset}, {model.num_params():,} parameters "
        f"({model.num_params(non_embedding=True):,} in blocks), device {device}, precision {precision}, "
        f"{torch.get_num_threads()} CPU threads")
    optimizers = build_optimizers(model, lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=precision == "fp16")
    autocast_ctx = autocast_context(device, precision)
    sampler = data.train_sampler(info.rank, info.world_size, seed=args.seed, order="length" if args.curriculum else "corpus")
    start_step, train_state = 0, {"best_val_loss": float("inf"), "skipped_steps": 0, "tokens_seen": 0}
    if args.resume:
        state = checkpoint.load_checkpoint(run_dir, model, optimizers=optimizers, scaler=scaler,
                                           sampler=sampler, device=device, name="latest")
        start_step, train_state = state["step"], {**train_state, **state["train_state"]}
        saved = checkpoint.read_json(run_dir / checkpoint.RUN_CONFIG)["train"]
        for key in ("steps", "eval_interval", "checkpoint_interval", "warmup_steps", "curriculum_steps"):
            if getattr(args, key) is None:  # an auto-sized run resumes with the sizes it chose
                setattr(args, key, saved.get(key))
        log(f"resumed from {state['path']} at step {start_step} of {args.steps}")
    metrics = MetricsLogger(run_dir, resume_step=start_step if args.resume else None) if info.is_master else None

    byte_lengths = torch.from_numpy(data.tokenizer.byte_lengths())

    def run_eval(step: int) -> tuple[float, float]:
        max_batches = math.ceil(args.eval_tokens / (args.batch_size * args.seq_len * info.world_size))
        val = data.val_batches(args.batch_size, args.seq_len, max_batches, info.rank, info.world_size)
        val_loss, bpb = evaluate(model, val, device, autocast_ctx, info, byte_lengths)
        if info.is_master:
            metrics.log("eval", step, val_loss=val_loss, val_bpb=bpb)
            metrics.plot()
        return val_loss, bpb

    summary = {"losses": [], "val_losses": [], "run_dir": str(run_dir)}
    eval_seconds = 0.0
    if start_step == 0:
        t0 = time.perf_counter()
        val_loss, bpb = run_eval(0)
        summary["val_losses"].append((0, val_loss))
        eval_seconds = time.perf_counter() - t0
        log(f"step 0: val loss {val_loss:.4f} | bpb {bpb:.4f} "
            f"({eval_seconds:.1f} s)")
    auto_steps = args.steps is None
    if auto_steps:
        step_seconds = probe_step_seconds(config, args, device, precision, info)
        spent = time.perf_counter() - job_t0
        args.steps = max(10, int((args.time_budget - spent - (EVALS_PER_RUN + 1) * eval_seconds) / step_seconds))
        log(f"steps: {args.steps} (auto: {step_seconds:.2f} s/step, {eval_seconds:.1f} s/eval, {spent:.0f} s spent, "
            f"budget {args.time_budget:.0f} s; --steps N to choose)")
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else max(1, int(0.02 * args.steps))
    args.eval_interval = args.eval_interval or max(1, args.steps // EVALS_PER_RUN)
    args.checkpoint_interval = args.checkpoint_interval or max(1, args.steps // 4)
    if args.curriculum and args.curriculum_steps is None:
        args.curriculum_steps = max(1, int(0.3 * args.steps))

    def write_run_config() -> None:
        checkpoint.write_run_config(run_dir, config, {**vars(args), "precision": precision, "device": device,
                                                       "world_size": info.world_size})

    if info.is_master:
        write_run_config()

    # background batches; micro-batch i belongs to step i // grad_accum (sampler.batches counts micro-batches)
    batches = data_lib.Prefetcher(sampler, device=device, plan=lambda i: curriculum_plan(i // args.grad_accum, args))
    train_model = model
    if args.compile:
        if device.startswith("cuda"):
            train_model = torch.compile(model)
        else:
            log("--compile ignored: torch.compile is used on CUDA only (CPU inductor needs a C++ toolchain)")
    if info.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[info.local_rank] if device.startswith("cuda") else None)
    no_sync = train_model.no_sync if info.enabled else None

    peak_flops = device_peak_flops(device, precision)
    eval_interval = args.eval_interval if args.eval_interval > 0 else args.steps
    ckpt_interval = args.checkpoint_interval if args.checkpoint_interval > 0 else args.steps

    def lr_mult(step: int) -> float:
        return wsd_lr(step, args.steps, args.warmup_steps, args.decay_frac)

    def save(name: str, step: int, val_loss: float | None) -> None:
        if info.is_master:
            checkpoint.save_checkpoint(run_dir, name, model, config, step=step, optimizers=optimizers, scaler=scaler,
                                       sampler=batches, val_loss=val_loss, train_state=train_state,
                                       tokenizer_path=run_dir / checkpoint.TOKENIZER)
        barrier(info)

    bar = None
    try:
        if info.is_master and not args.no_progress:
            from tqdm import tqdm
            bar = tqdm(total=args.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        say = bar.write if bar is not None else log
        step = start_step
        train_time, window_time, window_tokens = 0.0, 0.0, 0  # pure training seconds (no eval, no saving)
        window_losses: list[float] = []  # the logged train loss is the mean over the log window
        loop_t0 = time.perf_counter()
        while step < args.steps:
            t0 = time.perf_counter()
            set_lr(optimizers, lr_mult(step))
            micro_batches = [next(batches) for _ in range(args.grad_accum)]
            loss = accumulate_gradients(train_model, micro_batches, autocast_ctx, scaler, no_sync)
            grad_norm, skipped = optimizer_step(train_model, optimizers, scaler, args.grad_clip)
            if device.startswith("cuda"):
                torch.cuda.synchronize(torch.device(device))
            step += 1
            seq_len = micro_batches[0][0].shape[1]
            step_tokens = sum(x.numel() for x, _ in micro_batches) * info.world_size
            window_time += time.perf_counter() - t0
            window_tokens += step_tokens
            window_losses.append(loss)
            train_state["skipped_steps"] += int(skipped)
            train_state["tokens_seen"] += step_tokens
            summary["losses"].append(loss)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_mult(step - 1):.2f}x")

            if step % args.log_interval == 0 or step == args.steps:
                tok_s = window_tokens / window_time
                mfu = tok_s * model.flops_per_token(seq_len) / (peak_flops * info.world_size) if peak_flops else None
                mean_loss = all_reduce_mean(sum(window_losses) / len(window_losses), info, device)
                record = dict(loss=mean_loss, lr=optimizers[0].param_groups[0]["lr"], lr_mult=lr_mult(step - 1),
                              grad_norm=grad_norm, tokens_per_s=tok_s, mfu=mfu, loss_scale=scaler.get_scale(),
                              skipped_steps=train_state["skipped_steps"], peak_mem_mb=peak_memory_mb(device),
                              seq_len=seq_len, tokens_seen=train_state["tokens_seen"])
                if info.is_master:
                    metrics.log("train", step, **record)
                    mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
                    say(f"step {step}/{args.steps} | loss {mean_loss:.4f} | lr {record['lr']:.2e} | grad norm {grad_norm:.3f} "
                        f"| {tok_s:,.0f} tok/s | MFU {mfu_text} | loss scale {record['loss_scale']:g} "
                        f"| skipped {train_state['skipped_steps']} | peak mem {record['peak_mem_mb']:,.0f} MB")
                train_time += window_time
                window_time, window_tokens, window_losses = 0.0, 0, []
                new_total = replan_steps(args, step, step - start_step, time.perf_counter() - loop_t0,
                                         time.perf_counter() - job_t0, info, device) if auto_steps else None
                if new_total is not None:
                    say(f"steps: {args.steps} -> {new_total} (auto: re-planned from the measured pace to fit --time-budget)")
                    args.steps = new_total
                    if bar is not None:
                        bar.total = new_total
                        bar.refresh()
                    if info.is_master:  # a resume must use the total the run is on
                        write_run_config()

            if step % eval_interval == 0 or step == args.steps:
                val_loss, bpb = run_eval(step)
                summary["val_losses"].append((step, val_loss))
                say(f"step {step}: val loss {val_loss:.4f} | bpb {bpb:.4f}")
                if val_loss < train_state["best_val_loss"]:
                    train_state["best_val_loss"] = val_loss
                    save("best", step, val_loss)
            if step % ckpt_interval == 0 or step == args.steps:
                save("latest", step, summary["val_losses"][-1][1] if summary["val_losses"] else None)
            if stop_at is not None and step >= stop_at:
                break
    finally:
        batches.close()
        if bar is not None:
            bar.close()

    train_time += window_time
    summary.update(skipped_steps=train_state["skipped_steps"], step=step, model=model, train_time_s=train_time,
                   tokens_per_s=train_state["tokens_seen"] / max(train_time, 1e-9) if start_step == 0 else None,
                   precision=precision, loss_scale=scaler.get_scale())
    if info.is_master:
        metrics.log("event", step, event="end", train_time_s=train_time, skipped_steps=train_state["skipped_steps"],
                    tokens_seen=train_state["tokens_seen"])
        metrics.close()
        log(f"done: {step} steps, {train_time:.0f} s of training; run folder {run_dir}")
    if args.humaneval_at_end and info.is_master and step == args.steps:
        run_humaneval(run_dir, args.humaneval_at_end, device, log)
    return summary


def run_humaneval(run_dir: Path, samples: int, device: str, log) -> None:
    """HumanEval pass@k of the run's best checkpoint through `python -m nanochat.eval`, when installed."""
    try:
        from nanochat.eval.__main__ import main as eval_main
    except ImportError as e:
        log(f"--humaneval-at-end skipped: nanochat.eval is not available ({e})")
        return
    log(f"humaneval: {samples} samples per problem on {run_dir}")
    rc = eval_main(["--task", "humaneval", "--checkpoint", str(run_dir), "--samples", str(samples), "--device", device])
    if rc != 0:
        log(f"humaneval: nanochat.eval exited with {rc}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        train(args)
    except (ConfigError, CheckpointError, DataError, FileNotFoundError) as e:
        # bad input: one clear line and exit code 2, like argparse, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
