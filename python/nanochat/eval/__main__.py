"""python -m nanochat.eval: bits per byte, HumanEval, MBPP and sample reports for one model.

The model is a training checkpoint (--checkpoint RUN_OR_CKPT, PyTorch, --device cpu|cuda) or an
exported GGUF (--model model.gguf, the CPU engine). Results go next to the model (or --out-dir):
eval_<task>.json (the summary table), eval_<task>.jsonl (per problem, code tasks), samples.md.

    python -m nanochat.eval --task bpb --checkpoint runs/tiny                 # held-out split of the run
    python -m nanochat.eval --task bpb --model runs/tiny/model.gguf --run runs/tiny
    python -m nanochat.eval --task bpb --model model.gguf --data some_text.txt
    python -m nanochat.eval --task humaneval --model model.gguf --limit 20
    python -m nanochat.eval --task humaneval --checkpoint runs/tiny --samples 10 --temperature 0.8
    python -m nanochat.eval --task mbpp --model model.gguf --data mbpp.jsonl
    python -m nanochat.eval --task samples --model model.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# OpenMP threads that spin while waiting lose badly on shared cores (a forward of the tiny model
# took 0.5-1.5 s instead of 0.07 s with two busy neighbours); must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from nanochat.cli_args import count_or_all, non_negative_float, positive_float, positive_int  # noqa: E402

TASKS = ("bpb", "humaneval", "mbpp", "samples")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nanochat.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=TASKS, help="what to evaluate")
    # the model
    p.add_argument("--checkpoint", help="run folder (best/, else latest/) or checkpoint folder: the PyTorch path")
    p.add_argument("--model", help="exported .gguf file: the CPU engine path")
    p.add_argument("--device", default="cpu", help="torch device for --checkpoint (cpu, cuda, cuda:1)")
    p.add_argument("--threads", type=positive_int, default=None, help="engine threads for --model (default: the engine's)")
    p.add_argument("--out-dir", help="where results go (default: next to the model)")
    # data
    p.add_argument("--data", help="bpb: any training --data spec (file, folder, .jsonl/.parquet, hf:NAME); "
                                  "mbpp: an MBPP-format .jsonl")
    p.add_argument("--run", help="bpb with --model: the run folder whose held-out split to use")
    p.add_argument("--seq-len", type=count_or_all, default=-1, help="bpb window length; -1 = the model's max_seq_len")
    p.add_argument("--eval-tokens", type=count_or_all, default=65536, help="bpb: tokens to score; -1 = all")
    p.add_argument("--batch-size", type=positive_int, default=8, help="bpb: windows per PyTorch forward")
    # generation and execution
    p.add_argument("--limit", type=count_or_all, default=-1, help="first K problems only; -1 = all")
    p.add_argument("--samples", type=positive_int, default=1, help="completions per problem (pass@k for k <= samples)")
    p.add_argument("--temperature", type=non_negative_float, default=None,
                   help="sampling temperature; default 0 (greedy) for one sample, 0.8 for several")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="most new tokens per completion (default 256 for code tasks, 96 for samples)")
    p.add_argument("--seed", type=int, default=0, help="seed of sample i is seed + i")
    p.add_argument("--timeout", type=positive_float, default=5.0, help="wall-clock seconds per sandboxed test run")
    p.add_argument("--memory-mb", type=positive_int, default=1024, help="address-space limit of a sandboxed run")
    p.add_argument("--workers", type=positive_int, default=2, help="sandboxed runs at the same time")
    return p


def print_table(title: str, rows: dict) -> None:
    width = max(len(k) for k in rows)
    print(f"\n{title}")
    print("-" * (width + 24))
    for key, value in rows.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")


def run_bpb(source, args) -> dict:
    from nanochat.eval import bpb

    if args.data:
        # ~8 bytes per token is more than any BPE averages, so this reads enough text and not the whole corpus
        max_bytes = -1 if args.eval_tokens < 0 else 8 * (args.eval_tokens + 1)
        tokens = bpb.tokens_of_texts(bpb.read_texts(args.data, max_bytes), source.tokenizer)
        data_name = args.data
    else:
        run_dir = args.run or args.checkpoint
        if run_dir is None:
            raise ValueError("--task bpb with --model needs --data TEXT or --run RUN_FOLDER (for its held-out split)")
        run_path = Path(run_dir)
        if not (run_path / "data.json").is_file() and (run_path.parent / "data.json").is_file():
            run_path = run_path.parent  # a checkpoint folder inside a run
        tokens = bpb.held_out_tokens(run_path)
        data_name = f"{run_path} (held-out split)"
    seq_len = source.max_seq_len if args.seq_len < 0 else min(args.seq_len, source.max_seq_len)
    windows = bpb.make_windows(tokens, seq_len, args.eval_tokens)
    result = bpb.evaluate_windows(source, windows)
    return {"data": str(data_name), "seq_len": seq_len, **result.to_dict()}


def run_code(source, args) -> dict:
    from nanochat.eval import codebench, humaneval, mbpp

    if args.task == "humaneval":
        tasks = [humaneval.to_task(p) for p in humaneval.load_problems(args.limit)]
    else:
        tasks = [mbpp.to_task(p) for p in mbpp.load_problems(args.data, args.limit)]
    temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 0.8)
    jsonl = source.out_dir / f"eval_{args.task}.jsonl"
    _, summary = codebench.run_code_tasks(source.complete, tasks, samples=args.samples, temperature=temperature,
                                          max_tokens=args.max_tokens or 256, timeout=args.timeout,
                                          memory_mb=args.memory_mb, workers=args.workers, seed=args.seed,
                                          jsonl_path=jsonl, desc=args.task)
    statuses = summary.pop("statuses")
    print(f"{args.task}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if k.startswith("pass@"))
          + f" | solved {summary['solved']}/{summary['problems']} | " + " ".join(f"{k}={v}" for k, v in statuses.items()))
    return {**summary, **{f"status_{k}": v for k, v in statuses.items()}, "per_problem": str(jsonl)}


def run_samples(source, args) -> dict:
    from nanochat.eval import samples

    temperature = args.temperature if args.temperature is not None else 0.0
    max_tokens = args.max_tokens or 96  # the report wants short, readable bits
    rows = samples.generate_samples(source.complete, max_tokens, temperature, args.seed)
    settings = f"temperature {temperature:g}, at most {max_tokens} new tokens, seed {args.seed}"
    path = samples.write_report(rows, source.out_dir / "samples.md", source.name, settings)
    print(f"wrote {path}")
    return {"prompts": len(rows), "report": str(path), "mean_seconds": sum(r["seconds"] for r in rows) / len(rows)}


def evaluate(args) -> dict:
    from nanochat.eval.source import load_source

    source = load_source(args.checkpoint, args.model, args.device, args.threads, args.out_dir)
    source.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runner = {"bpb": run_bpb, "humaneval": run_code, "mbpp": run_code, "samples": run_samples}[args.task]
    results = runner(source, args)
    report = {"task": args.task, "model": source.name, "path": args.checkpoint or args.model,
              "backend": "pytorch" if args.checkpoint else "gguf-engine", "seconds": round(time.perf_counter() - start, 2),
              **results}
    if args.task in ("humaneval", "mbpp"):
        from nanochat.eval.sandbox import sandbox_layers
        report["sandbox"] = sandbox_layers()
    out = source.out_dir / f"eval_{args.task}.json"
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print_table(f"{args.task} of {source.name} ({report['backend']})",
                {k: v for k, v in report.items() if not isinstance(v, dict)})
    print(f"wrote {out}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nanochat.checkpoint import CheckpointError
    from nanochat.eval.mbpp import MbppUnavailable

    try:
        evaluate(args)
    except (ValueError, FileNotFoundError, CheckpointError, MbppUnavailable) as e:
        # bad input: one clear line and exit code 2, like argparse, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
