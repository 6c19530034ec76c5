"""Choosing the next token and turning tokens into streamed text.

- `SamplingParams` / `TokenEvent`: the request and the streamed result (docs/contracts.md).
- `Sampler`: penalties, then greedy (temperature 0) or temperature + top-k + top-p sampling from a
  seeded generator; logprobs are the model's own (log-softmax of the raw logits).
  Penalties: repetition_penalty (CTRL / HF rule: a seen token's logit is divided by it when
  positive, multiplied when negative) counts prompt and generated tokens; presence and frequency
  penalties (OpenAI rule: logit -= presence * [count > 0] + frequency * count) count generated ones.
- `TextStream`: byte-level BPE tokens -> UTF-8 text, emitting characters only once all their bytes
  arrived, and holding back text that might be the start of a stop string (never emitted).

Speed (this runs once per token per sequence, next to a batched forward pass): greedy without
penalties is one argmax over the raw logits; penalties touch only the seen tokens; the 32k-wide
float64 work happens in place in per-sequence buffers (fresh 256 KB temporaries cost page faults);
the k best tokens are found by a threshold from block maxima instead of a full selection; and the
sampled token comes from a blockwise inverse CDF (block sums, then one block's running sum) instead
of a running sum over the whole vocabulary. Candidates are always ordered by descending logit, ties
by token id, so seeded draws do not depend on numpy's selection algorithm.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

import numpy as np

TOP_P_CANDIDATES = 256  # top-p first looks at the best 256 tokens, then 4x more until the nucleus fits
BLOCK = 64  # block width for the block maxima (top-k threshold) and the blockwise inverse CDF


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


def top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first, ties by lower index: np.argsort(-values, kind="stable")[:k]."""
    n = len(values)
    if k >= n:
        return np.argsort(-values, kind="stable")
    starts = np.arange(0, n, BLOCK)
    if k <= len(starts):  # the k-th largest block maximum: at least k values reach it, so the top k all do
        maxima = np.maximum.reduceat(values, starts)
        threshold = np.partition(maxima, len(maxima) - k)[len(maxima) - k]
    else:
        threshold = np.partition(values, n - k)[n - k]
    candidates = np.flatnonzero(values >= threshold)  # ascending ids, so the stable sort breaks ties by id
    return candidates[np.argsort(-values[candidates], kind="stable")[:k]]


def draw_index(weights: np.ndarray, u: float) -> int:
    """Index i with probability weights[i] / sum(weights) for u uniform in [0, 1): the first i whose running
    sum exceeds u * total, found by block sums first (a full running sum over 32k floats costs ~110 us)."""
    sums = np.add.reduceat(weights, np.arange(0, len(weights), BLOCK))
    cum = np.cumsum(sums)
    target = u * cum[-1]
    b = min(int(np.searchsorted(cum, target, side="right")), len(cum) - 1)
    block = weights[b * BLOCK:(b + 1) * BLOCK]
    inner = np.cumsum(block)
    inner += cum[b - 1] if b else 0.0
    i = int(np.searchsorted(inner, target, side="right"))
    if i == len(block):  # rounding put the target past this block's own running sum: its last likely token
        i = int(np.flatnonzero(block > 0)[-1])
    return b * BLOCK + i


class Sampler:
    """Per-sequence sampling state: the seeded generator, the seen tokens for the penalties, work buffers."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: list[int]):
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        self.seen = np.zeros(vocab_size, dtype=bool)  # prompt + generated, for repetition_penalty
        self.seen[np.asarray(prompt_ids, dtype=np.int64)] = True
        self._seen_ids: np.ndarray | None = None  # np.flatnonzero(seen), rebuilt after a new token is seen
        self.counts: dict[int, int] = {}  # generated token -> times, for presence/frequency
        self._buffers: dict[tuple[str, np.dtype], np.ndarray] = {}

    def buffer(self, name: str, like: np.ndarray, dtype=np.float64) -> np.ndarray:
        """A reusable work array shaped like `like` (allocated once per sequence, not per token)."""
        key = (name, np.dtype(dtype))
        buf = self._buffers.get(key)
        if buf is None or buf.shape != like.shape:
            buf = self._buffers[key] = np.empty(like.shape, dtype=dtype)
        return buf

    def penalize(self, logits: np.ndarray) -> np.ndarray:
        """Penalized logits [V]: the input itself when no penalty is set, else a work buffer valid until the next call."""
        p = self.p
        if p.repetition_penalty != 1.0:
            out = self.buffer("penalized", logits, logits.dtype)
            np.copyto(out, logits)
            if self._seen_ids is None:
                self._seen_ids = np.flatnonzero(self.seen)
            seen = out[self._seen_ids]
            out[self._seen_ids] = np.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
            logits = out
        if (p.presence_penalty or p.frequency_penalty) and self.counts:
            out = self.buffer("penalized64", logits)  # float64, as the OpenAI rule's arithmetic always was
            np.copyto(out, logits)
            ids = np.fromiter(self.counts, dtype=np.int64, count=len(self.counts))
            counts = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
            out[ids] = out[ids] - p.presence_penalty - p.frequency_penalty * counts
            logits = out
        return logits

    def choose(self, logits: np.ndarray) -> int:
        """Next token from penalized logits [V]."""
        p = self.p
        if p.temperature == 0:
            return int(np.argmax(logits))
        x = self.buffer("scaled", logits)
        np.copyto(x, logits)
        x /= p.temperature  # in float64, as logits.astype(np.float64) / temperature
        if 0 < p.top_k < len(x):
            candidates = top_indices(x, p.top_k)
            x = x[candidates]
        else:
            candidates = None  # the whole vocabulary, in id order
        x -= x.max()
        probs = np.exp(x, out=x)
        if p.top_p < 1.0:
            probs /= probs.sum()
            candidates, probs = top_p_filter(candidates, probs, p.top_p)
        i = draw_index(probs, self.rng.random())
        return i if candidates is None else int(candidates[i])

    def record(self, token: int) -> None:
        if not self.seen[token]:
            self.seen[token] = True
            self._seen_ids = None
        self.counts[token] = self.counts.get(token, 0) + 1

    def logprobs(self, logits: np.ndarray, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
        """log-softmax of the raw logits: the token's value and the n best (token, value), best first."""
        x = self.buffer("logprobs", logits)
        np.copyto(x, logits)
        x -= x.max()
        e = np.exp(x, out=self.buffer("exp", logits))
        x -= np.log(e.sum())
        return float(x[token]), [(int(i), float(x[i])) for i in (top_indices(x, n) if n > 0 else ())]


def top_p_filter(candidates: np.ndarray | None, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one), most likely
    first; candidates[i] is the token of probs[i] (None: the token is i)."""
    k = TOP_P_CANDIDATES
    while True:  # top_indices(probs, k) is a prefix of top_indices(probs, 4k): the nucleus is the same either way
        order = top_indices(probs, k)
        if k >= len(probs) or probs[order].sum() >= top_p:
            break
        k *= 4
    cum = np.cumsum(probs[order])
    keep = order[:int(np.searchsorted(cum, top_p)) + 1]
    kept = probs[keep]
    return (keep if candidates is None else candidates[keep]), kept / kept.sum()


# ---------------------------------------------------------------------------------------------
# Text: token bytes -> UTF-8 characters, with stop strings held back

class TextStream:
    """Incremental detokenizer with stop strings: push token bytes, get the text that is safe to emit.

    Work per push is bounded by the held-back text (shorter than the longest stop string), never the text so far."""

    def __init__(self, stop: list[str]):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = stop
        self.pending = ""  # decoded text held back because it may begin a stop string
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Text to emit after these bytes; sets `stopped` when a stop string completed (it is not emitted)."""
        if not self.stop:
            return self.decoder.decode(data)
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
