"""Bridge from the engine's blocking Request iterators to asyncio, for one HTTP request.

One HTTP request becomes several engine sequences (n choices, batched prompts). Each sequence is
drained by its own small daemon thread that hands TokenEvents to the event loop through an
asyncio.Queue, so the loop never blocks on the engine. `Generation.events()` yields
(choice index, TokenEvent) as they arrive from any sequence, and (choice index, None) when that
sequence has ended; while waiting it polls whether the
client has gone away. Leaving `events()` for any reason (disconnect, cancellation, error, normal
end) cancels every unfinished sequence, which frees its batch slot.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import AsyncIterator

from nanochat.serve.errors import InvalidRequest, Overloaded, ServiceUnavailable

DISCONNECT_POLL_S = 0.25  # how often a waiting generation checks that its client is still there
_DONE = object()


class ClientDisconnected(Exception):
    """The HTTP client went away; the generation was cancelled."""


class Generation:
    def __init__(self, scheduler, jobs: list[tuple[list[int], object]]):
        """Submit every (prompt_ids, SamplingParams) job; if one does not fit the queue, cancel all and raise."""
        from nanochat.engine import QueueFull

        self.start = time.perf_counter()
        self.requests = []
        self.finished: list[bool] = []
        self.cancelled = 0
        self._queue: asyncio.Queue | None = None
        try:
            for prompt_ids, params in jobs:
                self.requests.append(scheduler.submit(prompt_ids, params))
                self.finished.append(False)
        except QueueFull as e:
            self.cancel()
            raise Overloaded(f"{e}; nothing of this request was started (the queue size is the server's --max-queue)")
        except ValueError as e:  # the engine's own check of a prompt or parameter
            self.cancel()
            raise InvalidRequest(str(e))
        except RuntimeError as e:  # a closed scheduler (server shutting down)
            self.cancel()
            raise ServiceUnavailable(f"the engine is not accepting requests: {e}")

    def cancel(self) -> None:
        """Cancel the unfinished sequences (idempotent); `self.cancelled` counts them."""
        for i, req in enumerate(self.requests):
            if not self.finished[i]:
                req.cancel()
                self.finished[i] = True
                self.cancelled += 1

    def __del__(self):
        # safety net: a response that was dropped before it ever streamed must not leave sequences running
        try:
            self.cancel()
        except Exception:  # noqa: BLE001 - never raise from a finalizer (e.g. at interpreter exit)
            pass

    def ready(self) -> int:
        """Events already waiting to be yielded (lets a streaming response batch its writes)."""
        return self._queue.qsize() if self._queue is not None else 0

    async def events(self, http_request) -> AsyncIterator[tuple[int, object]]:
        loop = asyncio.get_running_loop()
        self._queue = queue = asyncio.Queue()
        for index, req in enumerate(self.requests):
            threading.Thread(target=_drain, args=(index, req, loop, queue), daemon=True,
                             name=f"nanochat-drain-{index}").start()
        remaining = len(self.requests)
        last_poll = time.monotonic()
        getter = None
        try:
            while remaining:
                if time.monotonic() - last_poll >= DISCONNECT_POLL_S:
                    last_poll = time.monotonic()
                    if await http_request.is_disconnected():
                        raise ClientDisconnected()
                if queue.empty():
                    # asyncio.wait (unlike wait_for) never cancels the pending get, so no event is lost
                    getter = getter or asyncio.ensure_future(queue.get())
                    await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
                    if not getter.done():
                        continue
                    index, item = getter.result()
                    getter = None
                else:
                    index, item = queue.get_nowait()
                if item is _DONE:
                    self.finished[index] = True
                    remaining -= 1
                    yield index, None
                elif isinstance(item, BaseException):
                    self.finished[index] = True
                    raise item
                else:
                    yield index, item
        finally:
            if getter is not None:
                getter.cancel()
            self.cancel()


def _drain(index: int, req, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
    """Thread body: iterate one engine Request and forward its events to the loop."""
    def put(item) -> bool:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (index, item))
            return True
        except RuntimeError:  # the loop is closed: the server is shutting down
            req.cancel()
            return False

    try:
        for event in req:
            if not put(event):
                return
    except Exception as e:
        put(e)
        return
    put(_DONE)
