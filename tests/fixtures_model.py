"""A tiny served model for the server tests: a random-init ternary GPT exported to GGUF (+ .mhc).

`build_tiny_gguf(folder)` trains a byte-level BPE tokenizer on a few sentences, builds a 2-layer
ternary GPT with 2 mHC streams from a fixed seed, and exports it with the engine teammate's
`nanochat.export.export_gguf` (the real export path, so the server loads a real GGUF). Training
is skipped on purpose: on 2 shared cores even a few steps take a minute, and the server tests
check protocol behaviour (greedy reproducibility, stops, counts), not reply quality.

The `tiny_gguf` fixture builds it once per test session under pytest's session temp folder;
every test module that imports the fixture shares that one file. `running_server(...)` starts the
real `python -m nanochat.serve` in a subprocess on a free loopback port and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT_S = 90  # imports + model load on 2 busy cores

TEXTS = ["the quick brown fox jumps over the lazy dog. " * 4, "hello world, how are you? i am fine, thanks. " * 4,
         "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"]
MAX_SEQ_LEN = 512  # long enough that a cancelled generation is surely cut short


def build_tiny_gguf(folder: Path) -> Path:
    """Build and export the tiny model into `folder`; returns the .gguf path (tiny.mhc lies next to it)."""
    import torch

    from nanochat.config import ModelConfig
    from nanochat.export import export_gguf
    from nanochat.model import GPT
    from nanochat.tokenizer import Tokenizer

    torch.manual_seed(0)
    tokenizer = Tokenizer.train(TEXTS, vocab_size=320)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_mult=2.0,
                      max_seq_len=MAX_SEQ_LEN, group_size=64, mhc_streams=2)
    model = GPT(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    return export_gguf(model, cfg, tokenizer, folder / "tiny.gguf", name="tiny")


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    folder = tmp_path_factory.getbasetemp() / "tiny_served_model"
    path = folder / "tiny.gguf"
    if not path.exists():  # another test module of this session may have built it already
        build_tiny_gguf(folder)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model: Path, *flags: str, log_path: Path | None = None):
    """Run `python -m nanochat.serve --model MODEL FLAGS...` on a free port; yields its base URL."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "python"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    log_path = log_path or model.parent / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "nanochat.serve", "--model", str(model), "--port", str(port),
                                 "--log-level", "warning", *flags], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer /health within {SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
