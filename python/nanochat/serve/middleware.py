"""Plain ASGI middleware: the request body size limit and per-request metrics.

The size limit reads the whole body before the app sees it (rejecting at the Content-Length
header when one is sent, else once the chunks add up past the limit and the client has finished
sending, or has sent DRAIN_FACTOR times the limit), then replays it;
after the replay, receive() passes through, so the app can still notice a client disconnect.
"""

from __future__ import annotations

import json

from nanochat.serve.errors import error_body
from nanochat.serve.metrics import Metrics, endpoint_label

DRAIN_FACTOR = 4  # an oversized body without Content-Length is read (and dropped) up to 4x the limit before the 413


async def _send_json(send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


class BodySizeLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, size: int | str) -> dict:
        return error_body(f"request body is {size} bytes; the limit is {self.max_bytes} bytes (--max-request-bytes)",
                          "invalid_request_error", None, "request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_json(send, 413, self._too_large(int(declared)))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending the body
                return
            size += len(message.get("body", b""))
            if size <= self.max_bytes:
                chunks.append(message.get("body", b""))
            elif not message.get("more_body", False) or size > DRAIN_FACTOR * self.max_bytes:
                # answering before the client has sent everything would reset its connection: drain a while first
                return await _send_json(send, 413, self._too_large(size if not message.get("more_body") else f"over {size}"))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class RequestMetrics:
    """Counts every HTTP response by endpoint and status (including 413s from the size limit)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_and_record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.requests.labels(endpoint_label(scope["path"]), str(status)).inc()
