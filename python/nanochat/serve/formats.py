"""OpenAI response shapes: whole responses, streaming chunks, logprobs, usage.

A `Choice` accumulates the TokenEvents of one engine sequence. Completions and chat differ
only in how a choice, a chunk and the logprobs are written, so each has a small `*Format`
class with the same methods; app.py drives either one the same way.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field


@dataclass
class Choice:
    max_tokens: int
    text: str = ""
    n_tokens: int = 0
    finish_reason: str | None = None
    logprob_items: list = field(default_factory=list)  # (token str, token bytes, logprob, top dict) per token

    def add(self, event, engine, want_logprobs: bool) -> None:
        """Append one TokenEvent; the engine names tokens (token_text, token_bytes) as its top_logprobs do."""
        self.n_tokens += 1
        self.text += event.text
        if want_logprobs and event.logprob is not None:
            self.logprob_items.append((engine.token_text(event.token_id), list(engine.token_bytes(event.token_id)),
                                       event.logprob, event.top_logprobs or {}))
        if event.finish_reason:
            self.finish_reason = event.finish_reason

    def finish(self) -> str:
        """finish_reason once the sequence has ended (if the engine did not say, infer it)."""
        if self.finish_reason is None:
            self.finish_reason = "length" if self.n_tokens >= self.max_tokens else "stop"
        return self.finish_reason


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class CompletionFormat:
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, model: str, want_logprobs: bool):
        self.model, self.want_logprobs = model, want_logprobs
        self.id = self.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())

    def envelope(self, object: str, choices: list, usage_dict: dict | None) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage_dict}

    def logprobs(self, items: list, text_offset: int = 0) -> dict | None:
        if not self.want_logprobs:
            return None
        offsets, pos = [], text_offset
        for tok, _, _, _ in items:
            offsets.append(pos)
            pos += len(tok)
        return {"tokens": [t for t, _, _, _ in items], "token_logprobs": [lp for _, _, lp, _ in items],
                "top_logprobs": [dict(top) for _, _, _, top in items], "text_offset": offsets}

    def response(self, choices: list[Choice], usage_dict: dict) -> dict:
        return self.envelope(self.object, [
            {"index": i, "text": c.text, "logprobs": self.logprobs(c.logprob_items), "finish_reason": c.finish()}
            for i, c in enumerate(choices)], usage_dict)

    def start_chunks(self, n: int) -> list[dict]:
        return []

    def delta_chunk(self, index: int, text: str, items: list, text_offset: int) -> dict:
        choice = {"index": index, "text": text, "logprobs": self.logprobs(items, text_offset), "finish_reason": None}
        return self.envelope(self.chunk_object, [choice], None)

    def finish_chunk(self, index: int, finish_reason: str) -> dict:
        choice = {"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason}
        return self.envelope(self.chunk_object, [choice], None)


class ChatFormat(CompletionFormat):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def logprobs(self, items: list, text_offset: int = 0) -> dict | None:
        if not self.want_logprobs:
            return None
        def entry(tok: str, raw: list[int], lp: float) -> dict:
            return {"token": tok, "logprob": lp, "bytes": raw}
        return {"content": [{**entry(tok, raw, lp), "top_logprobs": [entry(t, list(t.encode("utf-8")), l) for t, l in top.items()]}
                            for tok, raw, lp, top in items]}

    def response(self, choices: list[Choice], usage_dict: dict) -> dict:
        return self.envelope(self.object, [
            {"index": i, "message": {"role": "assistant", "content": c.text},
             "logprobs": self.logprobs(c.logprob_items), "finish_reason": c.finish()}
            for i, c in enumerate(choices)], usage_dict)

    def start_chunks(self, n: int) -> list[dict]:
        return [self.envelope(self.chunk_object, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}], None) for i in range(n)]

    def delta_chunk(self, index: int, text: str, items: list, text_offset: int) -> dict:
        choice = {"index": index, "delta": {"content": text}, "logprobs": self.logprobs(items), "finish_reason": None}
        return self.envelope(self.chunk_object, [choice], None)

    def finish_chunk(self, index: int, finish_reason: str) -> dict:
        choice = {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason}
        return self.envelope(self.chunk_object, [choice], None)
