"""Choosing the next token and turning tokens into streamed text.

- `SamplingParams` / `TokenEvent`: the request and the streamed result (docs/contracts.md).
- `Sampler`: penalties, then greedy (temperature 0) or temperature + top-k + top-p sampling from a
  seeded generator; logprobs are the model's own (log-softmax of the raw logits).
  Penalties: repetition_penalty (CTRL / HF rule: a seen token's logit is divided by it when
  positive, multiplied when negative) counts prompt and generated tokens; presence and frequency
  penalties (OpenAI rule: logit -= presence * [count > 0] + frequency * count) count generated ones.
- `TextStream`: byte-level BPE tokens -> UTF-8 text, emitting characters only once all their bytes
  arrived, and holding back text that might be the start of a stop string (never emitted).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

import numpy as np

TOP_P_CANDIDATES = 256  # top-p first looks at the best 256 tokens; sorts the whole vocabulary only if needed


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # how many top alternatives to report per token

    def validate(self) -> None:
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"sampling parameter '{name}': expected {expected}, got {getattr(self, name)!r}")
        need(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "an integer >= 1")
        need(self.temperature >= 0, "temperature", ">= 0")
        need(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "an integer >= 0")
        need(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        need(self.repetition_penalty > 0, "repetition_penalty", "> 0")
        need(isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop), "stop",
             "a list of non-empty strings")
        need(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20), "logprobs",
             "None or an integer 0..20")


@dataclass
class TokenEvent:
    token_id: int
    text: str  # new UTF-8-complete text (may be "" while a character or a possible stop string is pending)
    logprob: float | None = None
    top_logprobs: dict[str, float] | None = None
    finish_reason: str | None = None  # "stop" | "length" | None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


class Sampler:
    """Per-sequence sampling state: the seeded generator and the token counts for the penalties."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: list[int]):
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        self.seen = np.zeros(vocab_size, dtype=bool)  # prompt + generated, for repetition_penalty
        self.seen[np.asarray(prompt_ids, dtype=np.int64)] = True
        self.counts = np.zeros(vocab_size, dtype=np.float32)  # generated only, for presence/frequency

    def penalize(self, logits: np.ndarray) -> np.ndarray:
        p = self.p
        if p.repetition_penalty != 1.0:
            logits = logits.copy()
            seen = logits[self.seen]
            logits[self.seen] = np.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            logits = logits - p.presence_penalty * (self.counts > 0) - p.frequency_penalty * self.counts
        return logits

    def choose(self, logits: np.ndarray) -> int:
        """Next token from penalized logits [V]."""
        p = self.p
        if p.temperature == 0:
            return int(np.argmax(logits))
        logits = logits.astype(np.float64) / p.temperature
        candidates = np.arange(logits.shape[0])
        if 0 < p.top_k < logits.shape[0]:
            candidates = np.argpartition(-logits, p.top_k - 1)[:p.top_k]
        probs = np.exp(logits[candidates] - logits[candidates].max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            candidates, probs = top_p_filter(candidates, probs, p.top_p)
        cdf = np.cumsum(probs)
        i = min(int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")), len(cdf) - 1)
        return int(candidates[i])

    def record(self, token: int) -> None:
        self.seen[token] = True
        self.counts[token] += 1


def top_p_filter(candidates: np.ndarray, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one)."""
    k = min(TOP_P_CANDIDATES, len(probs))
    best = np.argpartition(-probs, k - 1)[:k] if k < len(probs) else np.arange(len(probs))
    if probs[best].sum() < top_p and k < len(probs):
        best = np.arange(len(probs))  # the nucleus is larger than the candidates: sort everything
    order = best[np.argsort(-probs[best], kind="stable")]
    cum = np.cumsum(probs[order])
    keep = order[:int(np.searchsorted(cum, top_p)) + 1]
    kept = probs[keep]
    return candidates[keep], kept / kept.sum()


# ---------------------------------------------------------------------------------------------
# Text: token bytes -> UTF-8 characters, with stop strings held back

class TextStream:
    """Incremental detokenizer with stop strings: push token bytes, get the text that is safe to emit."""

    def __init__(self, stop: list[str]):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = stop
        self.pending = ""  # decoded text held back because it may begin a stop string
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Text to emit after these bytes; sets `stopped` when a stop string completed (it is not emitted)."""
        self.pending += self.decoder.decode(data)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of generation: everything still held (incomplete bytes become U+FFFD)."""
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return out
        hold = 0 if final else max((k for s in self.stop for k in range(1, min(len(s), len(self.pending)) + 1)
                                    if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out
