"""Continuous batching: many requests decoded together by one background thread.

Each step the thread admits waiting requests up to `max_batch` active sequences, then runs ONE
forward pass for everybody: the last sampled token of each decoding sequence, plus up to
`PREFILL_TOKENS_PER_STEP` prompt tokens of the sequences still being prefilled (a long prompt is
read over several steps, in admission order). All those tokens go through every linear as one batch,
while attention uses each sequence's own KV cache and position; each sequence that read its last
token (decode, or the end of its prompt) then samples one token and streams it. So a new prompt
costs the running sequences a somewhat longer step, never a pause for a whole prefill of its own.
Finished and cancelled sequences leave between steps; new ones join between steps. The waiting
queue is bounded: `submit` raises `QueueFull` rather than letting latency grow without limit.

A `Request` is an iterator of TokenEvents (blocking); `cancel()` stops it, e.g. when the client
disconnects. Errors inside the engine end the affected requests with the exception re-raised to
their consumers.
"""

from __future__ import annotations

import collections
import queue
import threading
import time

from nanochat.engine.engine import Engine
from nanochat.engine.sampling import SamplingParams, TokenEvent
from nanochat.engine.sequence import Sequence

_END = object()  # end-of-stream marker in a request's event queue
# prompt tokens read per step (the forward pass's GEMMs run 64 rows at a time anyway): bounds how long
# the decoding sequences wait when a long prompt arrives
PREFILL_TOKENS_PER_STEP = 128


class QueueFull(RuntimeError):
    """The scheduler's waiting queue is full; try again later (HTTP 429/503)."""


class Request:
    """Handle of one submitted generation: iterate it for TokenEvents; cancel() to stop early."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams):
        self.prompt_ids, self.params = prompt_ids, params
        self.events: queue.SimpleQueue = queue.SimpleQueue()  # C-implemented: cheaper puts than queue.Queue
        self.cancelled = threading.Event()
        self.submitted_at = time.monotonic()
        self.sequence: Sequence | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> "Request":
        return self

    def __next__(self) -> TokenEvent:
        item = self.events.get()
        if item is _END:
            self.events.put(_END)  # keep the stream ended for any later next()
            raise StopIteration
        if isinstance(item, BaseException):
            self.events.put(_END)
            raise item
        return item


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 8, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self.tokens_generated = 0
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="nanochat-scheduler", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Request:
        """Queue a generation; bad prompts/params raise ValueError here, a full queue raises QueueFull."""
        params = params or SamplingParams()
        params.validate()
        req = Request(self.engine.check_prompt(prompt_ids), params)
        with self._cond:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"request queue is full ({self.max_queue} waiting); try again later")
            self._waiting.append(req)
            self._cond.notify()
        return req

    def stats(self) -> dict:
        with self._cond:
            return {"queue_depth": len(self._waiting), "active": len(self._active), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "tokens_generated": self.tokens_generated, "steps": self.steps}

    def close(self) -> None:
        """Stop the thread; unfinished requests end (their iterators stop)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        for req in list(self._waiting) + self._active:
            req.events.put(_END)
        self._waiting.clear()
        self._active.clear()

    # -- the background loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._active:
                    self._cond.wait()
                if self._closed:
                    return
                # cancelled requests leave now: waiting ones without waiting for a slot, active ones before the step
                if any(r.cancelled.is_set() for r in self._waiting):
                    self._waiting = collections.deque(r for r in self._waiting if not self._retire_if_cancelled(r))
                self._active = [r for r in self._active if not self._retire_if_cancelled(r)]
                admitted = []
                while self._waiting and len(self._active) + len(admitted) < self.max_batch:
                    admitted.append(self._waiting.popleft())
            started = [r for r in admitted if self._start(r)]
            with self._cond:
                self._active += started  # active from admission on, so stats() never lags the stream
                batch = list(self._active)
            self._step(batch)

    def _start(self, req: Request) -> bool:
        """Give an admitted request its sequence (KV cache, sampler); False if it ended instead."""
        if self._retire_if_cancelled(req):
            return False
        try:
            req.sequence = self.engine.new_sequence(req.prompt_ids, req.params)
        except Exception as e:  # noqa: BLE001 - the consumer gets the error, the loop goes on
            req.events.put(e)
            req.events.put(_END)
            return False
        return True

    @staticmethod
    def _plan(batch: list[Request]) -> list[tuple[Request, list[int], bool]]:
        """(request, tokens to read, whether it samples after them) for this step's forward pass."""
        plan, budget = [], PREFILL_TOKENS_PER_STEP
        for req in batch:
            seq = req.sequence
            if seq.generated:
                plan.append((req, seq.next_tokens(), True))
            elif budget > 0:
                tokens = seq.next_tokens(budget)
                budget -= len(tokens)
                plan.append((req, tokens, seq.cache.length + len(tokens) == len(seq.prompt)))
        return plan

    def _step(self, batch: list[Request]) -> None:
        plan = self._plan(batch)
        if not plan:
            return
        try:
            logits = self.engine.model.forward([(tokens, req.sequence.cache) for req, tokens, _ in plan])
            events = [(req, req.sequence.consume(row)) for (req, _, samples), row in zip(plan, logits) if samples]
        except Exception as e:  # noqa: BLE001
            for req, _, _ in plan:
                req.sequence.finish_reason = "error"
                req.events.put(e)
                req.events.put(_END)
            events = []
        with self._cond:  # before the events go out, so stats() never lags what a consumer has seen
            self.steps += 1
            self._active = [r for r in self._active if not r.sequence.finished]
        for req, ev in events:
            self._emit(req, ev)

    def _emit(self, req: Request, ev: TokenEvent) -> None:
        self.tokens_generated += 1
        req.events.put(ev)
        if ev.finish_reason is not None:
            req.events.put(_END)

    @staticmethod
    def _retire_if_cancelled(req: Request) -> bool:
        if req.cancelled.is_set():
            req.events.put(_END)
            return True
        return False
