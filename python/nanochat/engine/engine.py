"""`Engine`: a loaded GGUF model on the CPU, with teacher-forced logits and streaming generation.

    engine = Engine.load("model.gguf")                 # validates the file (loader.py)
    engine.logits(ids)                                 # [T, V] f32, one prefill pass
    for ev in engine.generate(ids, SamplingParams(temperature=0)): print(ev.text, end="")

For many concurrent requests use `Scheduler` (continuous batching) on top of one Engine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from nanochat.config import ModelConfig
from nanochat.engine import kernels, loader
from nanochat.engine.model import Transformer
from nanochat.engine.sampling import SamplingParams, TokenEvent
from nanochat.engine.sequence import Sequence
from nanochat.tokenizer import Tokenizer


class Engine:
    def __init__(self, config: ModelConfig, transformer: Transformer, tokenizer: Tokenizer, stop_ids: set[int],
                 path: str = "<memory>"):
        self.config, self.model, self.tokenizer, self.stop_ids, self.path = config, transformer, tokenizer, stop_ids, path
        self._token_text_cache: dict[int, str] = {}
        # the tokenizer's byte table, built now: ~0.15 s (32k tokens) that otherwise lands on the first token served
        tokenizer.token_bytes(0)

    @classmethod
    def load(cls, path: str | os.PathLike, mhc_path: str | os.PathLike | None = None, threads: int | None = None) -> "Engine":
        """Load and validate a GGUF (+ optional .mhc override); threads sets the Rust kernels' thread count."""
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads: expected >= 1, got {threads}")
            kernels.set_num_threads(threads)
        kernels.limit_numpy_blas_threads(int(os.environ.get("NANOCHAT_BLAS_THREADS", "1")))
        cfg, weights, tokenizer, stop_ids = loader.load(path, mhc_path)
        return cls(cfg, Transformer(cfg, weights), tokenizer, stop_ids, str(Path(path)))

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    def check_prompt(self, ids: list[int]) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("prompt: expected at least one token, got none")
        if len(ids) > self.max_seq_len:
            raise ValueError(f"prompt: {len(ids)} tokens exceed the model's context of {self.max_seq_len} tokens")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} outside the vocabulary [0, {self.config.vocab_size})")
        return ids

    def logits(self, ids: list[int]) -> np.ndarray:
        """Teacher-forced logits [T, V] of every position, from one prefill pass."""
        ids = self.check_prompt(ids)
        return self.model.forward([(ids, self.model.new_cache(len(ids)))], all_logits=True)

    def token_bytes(self, token: int) -> bytes:
        return self.tokenizer.token_bytes(token)

    def token_text(self, token: int) -> str:
        """A token as text for top_logprobs (a partial UTF-8 character shows as U+FFFD)."""
        text = self._token_text_cache.get(token)
        if text is None:
            text = self._token_text_cache[token] = self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")
        return text

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """A sequence ready for its prefill, with a KV cache just big enough for prompt + max_tokens."""
        params.validate()
        prompt_ids = self.check_prompt(prompt_ids)
        capacity = max(len(prompt_ids), len(prompt_ids) + params.max_tokens - 1)
        return Sequence(prompt_ids, params, self.model.new_cache(capacity), self.config.vocab_size,
                        self.token_bytes, self.token_text, self.stop_ids)

    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """Stream the completion of one prompt, token by token (the last event has finish_reason set).

        Bad prompts or parameters raise here, before the first token."""
        seq = self.new_sequence(prompt_ids, params or SamplingParams())

        def stream() -> Iterator[TokenEvent]:
            while not seq.finished:
                logits = self.model.forward([(seq.next_tokens(), seq.cache)])
                yield seq.consume(logits[0])
        return stream()
