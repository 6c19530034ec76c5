"""The generate-then-execute loop shared by HumanEval and MBPP.

For each task the model writes `samples` completions of the task's prompt (greedy when the
temperature is 0), each cut at the task's stop strings; each completion is turned into a test
program by the task and run in the sandbox. Sandbox runs overlap with generation in a small thread
pool (they are subprocesses, the GIL is not held while waiting). pass@k uses the unbiased estimator.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from nanochat.eval.passk import mean_pass_at_k
from nanochat.eval.sandbox import run_program

PASS_AT = (1, 10, 100)


@dataclass
class CodeTask:
    task_id: str
    prompt: str  # what the model continues
    stop: list[str]  # the completion is cut at the first of these
    build_program: Callable[[str], str]  # completion -> full test program for the sandbox


def run_code_tasks(complete, tasks: list[CodeTask], samples: int = 1, temperature: float = 0.0,
                   max_tokens: int = 256, timeout: float = 5.0, memory_mb: int = 1024, workers: int = 2,
                   seed: int = 0, jsonl_path: str | Path | None = None, desc: str = "code") -> tuple[list[dict], dict]:
    """Generate, execute and score; returns (one row per task, summary). Rows also go to jsonl_path."""
    if samples < 1:
        raise ValueError(f"--samples: expected at least 1, got {samples}")
    if samples > 1 and temperature <= 0:
        raise ValueError(f"--samples {samples} with --temperature {temperature}: greedy decoding gives {samples} "
                         "identical samples; set a temperature > 0 for pass@k")
    pending = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for task in tqdm(tasks, desc=f"{desc}: generate", unit="problem"):
            completions = [complete(task.prompt, max_tokens, temperature, task.stop, seed + i) for i in range(samples)]
            futures = [pool.submit(run_program, task.build_program(c), timeout, memory_mb) for c in completions]
            pending.append((task, completions, futures))
        rows = []
        for task, completions, futures in tqdm(pending, desc=f"{desc}: execute", unit="problem"):
            results = [f.result() for f in futures]
            rows.append({"task_id": task.task_id, "n": samples, "c": sum(r.passed for r in results),
                         "completions": completions,
                         "results": [{"status": r.status, "reason": r.reason} for r in results]})
    if jsonl_path is not None:
        with open(jsonl_path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return rows, summarize(rows, samples, temperature)


def summarize(rows: list[dict], samples: int, temperature: float) -> dict:
    summary = {"problems": len(rows), "samples": samples, "temperature": temperature}
    for k in PASS_AT:
        if k <= samples and rows:
            summary[f"pass@{k}"] = mean_pass_at_k([(r["n"], r["c"]) for r in rows], k)
    statuses: dict[str, int] = {}
    for row in rows:
        for result in row["results"]:
            statuses[result["status"]] = statuses.get(result["status"], 0) + 1
    summary["statuses"] = statuses
    summary["solved"] = sum(r["c"] > 0 for r in rows)
    return summary
