"""The FastAPI app: OpenAI-compatible routes over the engine's Scheduler, plus the web chat page.

`create_app(settings)` loads the GGUF into an Engine, starts a Scheduler (continuous batching
in a background thread) and returns the app; the scheduler is closed when the app shuts down.
Routes: POST /v1/completions, POST /v1/chat/completions (JSON or `stream: true` server-sent
events ending in `data: [DONE]`), GET /v1/models, /health, /metrics, and / (static/index.html).
The server never touches kernels: a request becomes (prompt ids, SamplingParams) jobs for the
scheduler, and generation.py turns the scheduler's blocking iterators into async events.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from nanochat.serve.errors import (APIError, AuthenticationFailed, ContextLengthExceeded, InvalidRequest, NotFound,
                                   error_body, install_error_handlers)
from nanochat.serve.formats import ChatFormat, Choice, CompletionFormat, usage
from nanochat.serve.generation import ClientDisconnected, Generation
from nanochat.serve.metrics import Metrics
from nanochat.serve.middleware import BodySizeLimit, RequestMetrics
from nanochat.serve.schemas import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                    CompletionResponse, ModelCard, ModelList)
from nanochat.serve.settings import DEFAULT_COMPLETION_MAX_TOKENS, Settings

log = logging.getLogger("nanochat.serve")
INDEX_HTML = Path(__file__).parent / "static" / "index.html"
CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request": recorded when a client leaves mid-generation


def create_app(settings: Settings, engine=None) -> FastAPI:
    from nanochat.engine import Engine, Scheduler

    if engine is None:
        engine = Engine.load(settings.model, mhc_path=settings.mhc,
                             threads=None if settings.threads == -1 else settings.threads)
    scheduler = Scheduler(engine, max_batch=settings.max_batch, max_queue=settings.max_queue)
    tokenizer = engine.tokenizer
    model_name = settings.served_model_name
    metrics = Metrics(scheduler.stats)
    started = int(time.time())
    index_html = INDEX_HTML.read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        scheduler.close()

    app = FastAPI(title="nanochat-ternary", version="0.1.0", lifespan=lifespan)
    app.state.settings, app.state.engine, app.state.scheduler, app.state.metrics = settings, engine, scheduler, metrics
    install_error_handlers(app)
    # the middleware added last is the outermost: metrics see every response, including the size limit's 413
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)

    def require_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise AuthenticationFailed("missing or wrong API key: send 'Authorization: Bearer <key>' (the server's --api-key)")

    # ------------------------------------------------------------------ prompt -> jobs

    def check_max_tokens(requested: int | None, default: int, prompt_len: int, param: str) -> int:
        if requested is not None and requested > settings.max_tokens_limit:
            raise InvalidRequest(f"{param}: expected at most {settings.max_tokens_limit} (the server's --max-tokens-limit), got {requested}",
                                 param=param, code="invalid_value")
        room = engine.max_seq_len - prompt_len
        # ask for more than fits and you get what fits, ending with finish_reason "length"
        return min(requested if requested is not None else default, room)

    def check_prompt(ids: list[int], param: str) -> None:
        if len(ids) >= engine.max_seq_len:
            raise ContextLengthExceeded(
                f"{param}: {len(ids)} tokens, but the model's context is {engine.max_seq_len} tokens "
                f"and at least one must remain for the reply; shorten the {param}", param=param)
        bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise InvalidRequest(f"{param}: token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})", param=param)

    def sampling_params(body, max_tokens: int, logprobs: int | None, seed_offset: int):
        from nanochat.engine import SamplingParams
        params = SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
            repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, stop=body.stop_list(),
            # choice i gets seed+i: reproducible, yet the n choices differ; numpy wants seeds >= 0
            seed=None if body.seed is None else (body.seed + seed_offset) % 2**64, logprobs=logprobs)
        try:
            params.validate()
        except ValueError as e:  # the schema's bounds should catch everything first; this is the engine's word
            raise InvalidRequest(str(e)) from None
        return params

    def completion_jobs(body: CompletionRequest) -> tuple[list, list[int], int]:
        """(jobs, max_tokens of each choice, prompt tokens); choice p*n + j is sample j of prompt p."""
        if body.echo:
            raise InvalidRequest("echo: not supported by this server; send echo=false", param="echo")
        if body.suffix:
            raise InvalidRequest("suffix: not supported by this server", param="suffix")
        jobs, max_tokens_per_choice, prompt_tokens = [], [], 0
        for prompt in body.prompt_batch():
            ids = [tokenizer.bos_id] + tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            check_prompt(ids, "prompt")
            max_tokens = check_max_tokens(body.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, len(ids), "max_tokens")
            prompt_tokens += len(ids)
            for _ in range(body.n):
                jobs.append((ids, sampling_params(body, max_tokens, body.logprobs, len(jobs))))
                max_tokens_per_choice.append(max_tokens)
        return jobs, max_tokens_per_choice, prompt_tokens

    def chat_jobs(body: ChatCompletionRequest) -> tuple[list, list[int], int]:
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequest("top_logprobs: requires logprobs=true", param="top_logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        ids = tokenizer.render_chat(messages, add_generation_prompt=True)
        check_prompt(ids, "messages")
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = check_max_tokens(requested, settings.max_tokens_limit, len(ids), param)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        jobs = [(ids, sampling_params(body, max_tokens, logprobs, i)) for i in range(body.n)]
        return jobs, [max_tokens] * body.n, len(ids)

    # ------------------------------------------------------------------ generation

    async def respond(request: Request, body, fmt: CompletionFormat, jobs, max_tokens: list[int], prompt_tokens: int, endpoint: str):
        generation = Generation(scheduler, jobs)
        metrics.prompt_tokens.inc(prompt_tokens)
        choices = [Choice(max_tokens=m) for m in max_tokens]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(request, generation, fmt, choices, prompt_tokens, include_usage, endpoint),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        first_token = True
        try:
            async for index, event in generation.events(request):
                if event is None:
                    choices[index].finish()
                    continue
                if first_token:
                    metrics.ttft_seconds.labels(endpoint).observe(time.perf_counter() - generation.start)
                    first_token = False
                choices[index].add(event, engine, fmt.want_logprobs)
                metrics.completion_tokens.inc()
        except ClientDisconnected:
            generation.cancel()
            metrics.cancelled.inc(generation.cancelled)
            return Response(status_code=CLIENT_CLOSED_STATUS)
        finally:
            generation.cancel()
        metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - generation.start)
        return JSONResponse(fmt.response(choices, usage(prompt_tokens, sum(c.n_tokens for c in choices))))

    async def stream(request: Request, generation: Generation, fmt: CompletionFormat, choices: list[Choice],
                     prompt_tokens: int, include_usage: bool, endpoint: str):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        text_offsets = [0] * len(choices)
        first_token = True
        completed = False
        pending = ""  # SSE text not yet written: events that arrive together go out in one write
        try:
            for chunk in fmt.start_chunks(len(choices)):
                yield sse(chunk)
            async for index, event in generation.events(request):
                choice = choices[index]
                if event is None:
                    pending += sse(fmt.finish_chunk(index, choice.finish()))
                else:
                    if first_token:
                        metrics.ttft_seconds.labels(endpoint).observe(time.perf_counter() - generation.start)
                        first_token = False
                    seen = len(choice.logprob_items)
                    choice.add(event, engine, fmt.want_logprobs)
                    metrics.completion_tokens.inc()
                    new_items = choice.logprob_items[seen:]
                    if event.text or new_items:
                        pending += sse(fmt.delta_chunk(index, event.text, new_items, text_offsets[index]))
                        text_offsets[index] += len(event.text)
                if pending and not generation.ready():
                    yield pending
                    pending = ""
            if include_usage:
                pending += sse({**fmt.envelope(fmt.chunk_object, [], None),
                                "usage": usage(prompt_tokens, sum(c.n_tokens for c in choices))})
            yield pending + "data: [DONE]\n\n"
            completed = True
            metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - generation.start)
        except ClientDisconnected:
            pass
        except APIError as e:  # headers are sent: report the error in the stream itself
            yield pending + sse(error_body(e.message, e.type, e.param, e.code))
        except Exception:
            log.exception("generation failed mid-stream")
            yield pending + sse(error_body("internal server error during generation; see the server log", "server_error"))
        finally:
            generation.cancel()
            if not completed:
                metrics.cancelled.inc(generation.cancelled)

    # ------------------------------------------------------------------ routes

    @app.post("/v1/completions", response_model=CompletionResponse, dependencies=[Depends(require_api_key)])
    async def completions(request: Request, body: CompletionRequest):
        jobs, max_tokens, prompt_tokens = completion_jobs(body)
        fmt = CompletionFormat(model_name, want_logprobs=body.logprobs is not None)
        return await respond(request, body, fmt, jobs, max_tokens, prompt_tokens, "/v1/completions")

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, dependencies=[Depends(require_api_key)])
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        jobs, max_tokens, prompt_tokens = chat_jobs(body)
        fmt = ChatFormat(model_name, want_logprobs=body.logprobs)
        return await respond(request, body, fmt, jobs, max_tokens, prompt_tokens, "/v1/chat/completions")

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(require_api_key)])
    async def models():
        return ModelList(data=[ModelCard(id=model_name, created=started)])

    @app.get("/v1/models/{model_id}", response_model=ModelCard, dependencies=[Depends(require_api_key)])
    async def model_card(model_id: str):
        if model_id != model_name:
            raise NotFound(f"model {model_id!r} is not served here; this server serves {model_name!r}", param="model",
                           code="model_not_found")
        return ModelCard(id=model_name, created=started)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "max_seq_len": engine.max_seq_len,
                "max_tokens_limit": settings.max_tokens_limit, **scheduler.stats()}

    @app.get("/metrics")
    async def prometheus_metrics():
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(index_html)

    return app
