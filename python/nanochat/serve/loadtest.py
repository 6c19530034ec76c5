"""Load-test a running server: concurrent streaming clients, time to first token, tokens per second.

    python -m nanochat.serve --model model.gguf &
    python -m nanochat.serve.loadtest --url http://127.0.0.1:8080 --clients 8 --requests 32 --max-tokens 64
    python -m nanochat.serve.loadtest --direct model.gguf --clients 8 --requests 32 --max-tokens 64

Each client thread sends streaming /v1/completions requests (greedy, so every request runs its full
max_tokens unless the model emits an end token) one after another until `--requests` are done, and
records the time to the first streamed token and to the last. `--direct` runs the same workload
through the engine's Scheduler in this process instead of over HTTP; comparing the two gives the
server's own overhead.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import threading
import time

import httpx
from tqdm import tqdm

PROMPTS = ["def fibonacci(n):", "The capital of France is", "import numpy as np\n", "Once upon a time"]


_local = threading.local()


def http_request(url: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, total time, tokens) of one streaming completion."""
    if not hasattr(_local, "client"):  # one client per thread: a new httpx.Client costs ~100 ms (SSL setup)
        _local.client = httpx.Client(base_url=url, timeout=600)
    start, first, tokens = time.perf_counter(), None, 0
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with _local.client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return (first or end) - start, end - start, tokens


def direct_request(scheduler, tokenizer, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    from nanochat.engine import SamplingParams
    start, first, tokens = time.perf_counter(), None, 0
    for _ in scheduler.submit([tokenizer.bos_id] + tokenizer.encode(prompt), SamplingParams(max_tokens=max_tokens, temperature=0)):
        first = first or time.perf_counter()
        tokens += 1
    end = time.perf_counter()
    return (first or end) - start, end - start, tokens


def run(one_request, clients: int, requests: int, max_tokens: int) -> dict:
    results, errors, lock = [], [], threading.Lock()
    counter = iter(range(requests))
    bar = tqdm(total=requests, desc="requests", unit="req")

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                r = one_request(PROMPTS[i % len(PROMPTS)], max_tokens)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(repr(e))
                    bar.update(1)
                continue
            with lock:
                results.append(r)
                bar.update(1)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    bar.close()
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    return {"requests": len(results), "errors": len(errors), "first_error": errors[0] if errors else None,
            "wall_s": round(wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(1000 * statistics.median(ttft), 1) if ttft else None,
            "ttft_p95_ms": round(1000 * ttft[math.ceil(0.95 * len(ttft)) - 1], 1) if ttft else None,  # nearest rank
            "latency_p50_s": round(statistics.median(r[1] for r in results), 3) if results else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanochat.serve.loadtest", description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8080")
    target.add_argument("--direct", metavar="GGUF", help="run the workload through the engine's Scheduler in-process")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--requests", type=int, default=32, help="requests in total (default 32)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("--max-batch", type=int, default=8, help="with --direct: the scheduler's batch size (default 8)")
    parser.add_argument("--threads", type=int, default=-1, help="with --direct: kernel threads (-1 = engine default)")
    args = parser.parse_args(argv)

    if args.url:
        report = run(lambda p, m: http_request(args.url.rstrip("/"), p, m), args.clients, args.requests, args.max_tokens)
    else:
        from nanochat.engine import Engine, Scheduler
        engine = Engine.load(args.direct, threads=None if args.threads == -1 else args.threads)
        scheduler = Scheduler(engine, max_batch=args.max_batch, max_queue=max(64, args.requests))
        try:
            report = run(lambda p, m: direct_request(scheduler, engine.tokenizer, p, m), args.clients, args.requests,
                         args.max_tokens)
        finally:
            scheduler.close()
    print(json.dumps({"target": args.url or f"direct:{args.direct}", "clients": args.clients,
                      "max_tokens": args.max_tokens, **report}, indent=2))


if __name__ == "__main__":
    main()
