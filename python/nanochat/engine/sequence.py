"""One generating sequence: its KV cache, sampler and text stream, and when it is finished.

Shared by `Engine.generate` (one sequence) and the `Scheduler` (many, batched): both run the model
on `next_tokens()` and hand the resulting logits row to `consume`, which picks the token and
returns the TokenEvent to stream.
"""

from __future__ import annotations

import numpy as np

from nanochat.engine.model import KVCache
from nanochat.engine.sampling import Sampler, SamplingParams, TextStream, TokenEvent


class Sequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, cache: KVCache, vocab_size: int,
                 token_bytes, token_text, stop_ids: set[int]):
        self.params = params
        self.prompt = prompt_ids
        self.cache = cache
        self.sampler = Sampler(params, vocab_size, prompt_ids)
        self.text = TextStream(params.stop)
        self.token_bytes, self.token_text, self.stop_ids = token_bytes, token_text, stop_ids
        self.generated: list[int] = []
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def next_tokens(self, limit: int | None = None) -> list[int]:
        """What the model must read next: the rest of the prompt (at most `limit` tokens of it, for prefilling
        in chunks), then the last sampled token. Only the pass that reads the prompt's last token gives logits
        to `consume`."""
        if self.generated:
            return self.generated[-1:]
        start = self.cache.length
        return self.prompt[start:] if limit is None else self.prompt[start:start + limit]

    def consume(self, logits: np.ndarray) -> TokenEvent:
        """Sample from one logits row [V] and say what to stream."""
        sampler, p = self.sampler, self.params
        token = sampler.choose(sampler.penalize(logits))
        sampler.record(token)
        self.generated.append(token)
        logprob = top = None
        if p.logprobs is not None:  # the only place that needs the whole log-softmax
            logprob, best = sampler.logprobs(logits, token, p.logprobs)
            top = {self.token_text(i): lp for i, lp in best} if p.logprobs > 0 else None
        if token in self.stop_ids:
            text, self.finish_reason = self.text.flush(), "stop"  # a control token ends the reply, unprinted
        else:
            text = self.text.push(self.token_bytes(token))
            if self.text.stopped:
                self.finish_reason = "stop"
            elif len(self.generated) >= p.max_tokens or self.cache.length >= self.cache.capacity:
                text += self.text.flush()
                self.finish_reason = "length"
        return TokenEvent(token, text, logprob, top, self.finish_reason)
