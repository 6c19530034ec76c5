"""The OpenAI-compatible server, end to end: the real `python -m nanochat.serve` on a loopback port.

A tiny random-init ternary GPT is exported to GGUF (tests/fixtures_model.py) and served. Replies are
checked against the engine itself (greedy output must equal `Engine.generate` on the same ids),
with the official `openai` client (streaming and not, completions and chat, n > 1, logprobs, stop,
seed), raw httpx for malformed requests, 16 concurrent clients, and clients that disconnect
mid-generation (their slots must be freed and counted in /metrics).

    .venv/bin/python -m pytest tests/test_serve.py -q
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from nanochat.serve.settings import parse_settings
from tests.fixtures_model import REPO, running_server, tiny_gguf  # noqa: F401 - the fixture is used by name

MAX_TOKENS_LIMIT = 500
MAX_REQUEST_BYTES = 20_000
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(tiny_gguf):  # noqa: F811
    flags = ["--mhc", str(tiny_gguf.with_suffix(".mhc")), "--threads", "1", "--max-batch", "4", "--max-queue", "32",
             "--max-request-bytes", str(MAX_REQUEST_BYTES), "--max-tokens-limit", str(MAX_TOKENS_LIMIT)]
    with running_server(tiny_gguf, *flags) as url:
        yield url


@pytest.fixture(scope="module")
def strict_server(tiny_gguf):  # noqa: F811
    """One batch slot, one queue place, and an API key."""
    with running_server(tiny_gguf, "--max-batch", "1", "--max-queue", "1", "--api-key", "sesame") as url:
        yield url


@pytest.fixture(scope="module")
def engine(tiny_gguf):  # noqa: F811
    from nanochat.engine import Engine
    return Engine.load(tiny_gguf)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(engine, ids: list[int], max_tokens: int, stop: list[str] | None = None) -> tuple[str, str]:
    from nanochat.engine import SamplingParams
    events = list(engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0, stop=stop or [])))
    return "".join(e.text for e in events), events[-1].finish_reason


def completion_ids(engine, prompt: str) -> list[int]:
    return [engine.tokenizer.bos_id] + engine.tokenizer.encode(prompt)


def stats(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name + labels)} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def wait_idle(url: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = stats(url)
        if s["active"] == 0 and s["queue_depth"] == 0:
            return s
        assert time.monotonic() < deadline, f"scheduler did not go idle: {s}"
        time.sleep(0.05)


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert "Traceback" not in response.text
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


# ------------------------------------------------------------------------------------------------
# openai client: completions and chat

def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    health = stats(server)
    assert health["status"] == "ok" and health["max_seq_len"] == 512


def test_completion_greedy_matches_engine(client, engine):
    prompt = "the quick brown"
    want, reason = greedy(engine, completion_ids(engine, prompt), 12)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == want and r.choices[0].finish_reason == reason == "length"
    assert r.usage.prompt_tokens == len(completion_ids(engine, prompt))
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_completion_stream_equals_nonstream(client):
    kwargs = dict(model="tiny", prompt="hello world", max_tokens=10, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert len(chunks) >= 3  # streamed in pieces, not as one blob
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_matches_engine_streaming_and_not(client, engine):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "how are you?"}]
    want, reason = greedy(engine, engine.tokenizer.render_chat(messages), 10)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.choices[0].finish_reason == reason
    assert r.usage.prompt_tokens == len(engine.tokenizer.render_chat(messages))

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_raw_sse_framing(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"  # ends with the [DONE] event
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1


def test_token_prompts_and_prompt_batches(client, engine):
    ids = completion_ids(engine, "the quick")
    want = greedy(engine, ids, 6)[0]
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0).choices[0].text == want
    other = greedy(engine, completion_ids(engine, "hello"), 6)[0]
    r = client.completions.create(model="tiny", prompt=["the quick", "hello"], n=2, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]  # prompt p, sample j -> choice p * n + j
    assert [c.text for c in r.choices] == [want, want, other, other]
    assert r.usage.prompt_tokens == len(ids) + len(completion_ids(engine, "hello"))


def test_seed_reproducible_and_n_choices(client):
    kwargs = dict(model="tiny", prompt="def fibonacci(n):", max_tokens=12, temperature=1.0)
    a = client.completions.create(seed=7, **kwargs).choices[0].text
    b = client.completions.create(seed=7, **kwargs).choices[0].text
    c = client.completions.create(seed=8, **kwargs).choices[0].text
    assert a == b and a != c
    many = client.completions.create(seed=7, n=3, **kwargs)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    texts = [ch.text for ch in many.choices]
    assert texts[0] == a and texts[1] == c  # choice i is sampled with seed + i
    assert len(set(texts)) == 3 and 3 <= many.usage.completion_tokens <= 36  # sampling may hit <|end|> early


def test_chat_n_choices_streamed(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, n=2, seed=3, stream=True))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"}
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) for i in (0, 1)]
    whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=6, n=2, seed=3)
    assert texts == [ch.message.content for ch in whole.choices]


def test_logprobs(client):
    r = client.completions.create(model="tiny", prompt="the lazy", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 3
        # greedy picks the most likely token (texts of partial-UTF-8 tokens may collide as keys of top)
        assert chosen >= max(top.values()) - 1e-9

    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) <= 2
        assert item.logprob >= max(t.logprob for t in item.top_logprobs) - 1e-9
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.choices[0].logprobs is None
    chunks = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                            temperature=0, logprobs=True, top_logprobs=2, stream=True)
    streamed = [item for c in chunks if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert [(i.token, i.logprob) for i in streamed] == [(i.token, i.logprob) for i in content]


def test_stop_strings(client):
    kwargs = dict(model="tiny", prompt="how are", max_tokens=24, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    # a stop string from the middle of the greedy reply: the reply must end just before it
    cut = next(i for i in range(4, len(full) - 2) if full[i:i + 2].isascii() and full[i:i + 2].isprintable())
    stop = full[cut:cut + 2]
    r = client.completions.create(stop=[stop, "\x00never"], **kwargs)
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(stop=stop, stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]


def test_limits_through_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=MAX_TOKENS_LIMIT + 1)
    assert e.value.body["param"] == "max_tokens" and "max-tokens-limit" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 600}])
    assert e.value.body["code"] == "context_length_exceeded" and "512" in e.value.body["message"]


# ------------------------------------------------------------------------------------------------
# raw HTTP: malformed requests, errors in OpenAI's envelope

def test_malformed_requests(server):
    post = lambda path, **kw: httpx.post(server + path, timeout=30, **kw)  # noqa: E731
    assert_error(post("/v1/completions", content=b'{"prompt": "hi",', headers={"content-type": "application/json"}),
                 400, code="invalid_json")
    err = assert_error(post("/v1/completions", json={"prompt": "hi", "max_tokens": "many"}), 400, param="max_tokens")
    assert "many" in err["message"]
    assert_error(post("/v1/completions", json={"prompt": "hi", "temperature": 5}), 400, param="temperature")
    assert_error(post("/v1/completions", json={"max_tokens": 3}), 400, param="prompt", code="missing_field")
    assert_error(post("/v1/completions", json={"prompt": [1, "a"]}), 400, param="prompt")
    assert_error(post("/v1/completions", json={"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}), 400, param="stop")
    assert_error(post("/v1/chat/completions", json={"messages": "hello"}), 400, param="messages")
    assert_error(post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}), 400,
                 param="messages[0].role")
    assert_error(post("/v1/chat/completions", json={"messages": []}), 400, param="messages")
    assert_error(post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
                 400, param="top_logprobs")
    assert_error(post("/v1/completions", json={"prompt": [5, 10_000]}), 400, param="prompt")


def test_size_and_context_limits(server):
    big = {"prompt": "a" * (MAX_REQUEST_BYTES + 10)}
    err = assert_error(httpx.post(server + "/v1/completions", json=big, timeout=30), 413, code="request_too_large")
    assert str(MAX_REQUEST_BYTES) in err["message"]

    def chunked():  # no Content-Length: the limit must hold while reading
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"a" * 1000
        yield b'"}'
    assert_error(httpx.post(server + "/v1/completions", content=chunked(), timeout=30,
                            headers={"content-type": "application/json"}), 413)
    err = assert_error(httpx.post(server + "/v1/completions", json={"prompt": list(range(4, 604))}, timeout=30),
                       400, param="prompt", code="context_length_exceeded")
    assert "600 tokens" in err["message"] and "512" in err["message"]


def test_unknown_routes_and_methods(server):
    assert_error(httpx.get(server + "/v1/nothing", timeout=10), 404, code="not_found")
    assert_error(httpx.get(server + "/v1/completions", timeout=10), 405)
    assert_error(httpx.delete(server + "/v1/models", timeout=10), 405)


def test_index_page_is_self_contained(server):
    r = httpx.get(server + "/", timeout=10)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "/v1/chat/completions" in r.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", r.text)  # no external resources


def test_api_key_and_full_queue(strict_server):
    assert_error(httpx.get(strict_server + "/v1/models", timeout=10), 401, code="invalid_api_key")
    bad = openai.OpenAI(base_url=strict_server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(strict_server + "/health", timeout=10).status_code == 200  # health needs no key
    good = openai.OpenAI(base_url=strict_server + "/v1", api_key="sesame", max_retries=0, timeout=60)
    assert good.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0).usage.completion_tokens == 2
    # one batch slot + one queue place: the third sequence of an n=3 request cannot be queued
    with pytest.raises(openai.RateLimitError) as e:
        good.completions.create(model="tiny", prompt="hi", max_tokens=100, n=3)
    assert e.value.body["code"] == "queue_full"
    wait_idle(strict_server)  # the two admitted sequences were cancelled, not left running
    assert metric(strict_server, "nanochat_requests_total", '{endpoint="/v1/completions",status="429"}') == 1


# ------------------------------------------------------------------------------------------------
# many clients, and clients that leave

def test_concurrent_clients_get_their_own_answers(server, client, engine):
    prompts = ["the quick", "hello world", "def fibonacci(n):", "how are you"]
    want = {p: greedy(engine, completion_ids(engine, p), 8)[0] for p in prompts}
    results, errors = {}, []

    def worker(i: int) -> None:
        try:
            prompt = prompts[i % len(prompts)]
            if i % 2:
                r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
                results[i] = (prompt, r.choices[0].text)
            else:
                chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True)
                results[i] = (prompt, "".join(c.choices[0].text for c in chunks))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 16
    for prompt, text in results.values():
        assert text == want[prompt]
    wait_idle(server)


def test_event_loop_stays_responsive_during_generation(server):
    """The engine's blocking iterators run off the event loop: /health answers while 4 sequences decode."""
    body = {"prompt": "the", "max_tokens": 300, "temperature": 0, "n": 4}
    worker = threading.Thread(target=lambda: httpx.post(server + "/v1/completions", json=body, timeout=120))
    worker.start()
    seen_active, slowest = 0, 0.0
    with httpx.Client(base_url=server, timeout=30) as http:
        while worker.is_alive():
            start = time.perf_counter()
            seen_active = max(seen_active, http.get("/health").json()["active"])
            slowest = max(slowest, time.perf_counter() - start)
            time.sleep(0.01)
    worker.join()
    assert seen_active == 4 and slowest < 1.0, (seen_active, slowest)


def test_disconnecting_clients_free_their_slots(server):
    cancelled_before = metric(server, "nanochat_cancelled_sequences_total")
    tokens_before = stats(server)["tokens_generated"]
    # greedy from "the" runs the full 500 tokens (no end token): only a cancel can cut it short
    body = {"prompt": "the", "max_tokens": MAX_TOKENS_LIMIT, "temperature": 0, "n": 2, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=30) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["object"] == "text_completion"
    # the stream was closed after its first token: both sequences must be cancelled, not run to 500 tokens
    s = wait_idle(server)
    assert s["tokens_generated"] - tokens_before < 2 * MAX_TOKENS_LIMIT
    assert metric(server, "nanochat_cancelled_sequences_total") >= cancelled_before + 2

    # a non-streaming client that gives up (timeout) frees its slots too: 4 prompts x 8 choices x 500 tokens
    # in eight waves of 4 (--max-batch 4) take over half a second (8 x 500 took only 0.3 s), the client leaves after 0.15 s
    tokens_before = s["tokens_generated"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/completions", json={**body, "prompt": ["the"] * 4, "stream": False, "n": 8},
                   timeout=httpx.Timeout(30, read=0.15))
    s = wait_idle(server)
    assert s["tokens_generated"] - tokens_before < 32 * MAX_TOKENS_LIMIT
    assert metric(server, "nanochat_requests_total", '{endpoint="/v1/completions",status="499"}') >= 1


def test_metrics_count_requests_tokens_and_latency(server, client):
    httpx.get(server + "/no/such/page", timeout=10)
    before = metric(server, "nanochat_completion_tokens_total")
    ok_before = metric(server, "nanochat_requests_total", '{endpoint="/v1/chat/completions",status="200"}')
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert metric(server, "nanochat_completion_tokens_total") == before + r.usage.completion_tokens > before
    assert metric(server, "nanochat_requests_total", '{endpoint="/v1/chat/completions",status="200"}') == ok_before + 1
    assert metric(server, "nanochat_time_to_first_token_seconds_count", '{endpoint="/v1/chat/completions"}') >= 1
    assert metric(server, "nanochat_request_duration_seconds_count", '{endpoint="/v1/chat/completions"}') >= 1
    assert metric(server, "nanochat_requests_total", '{endpoint="other",status="404"}') >= 1
    text = httpx.get(server + "/metrics", timeout=10).text
    assert "nanochat_queue_depth 0.0" in text and "nanochat_active_sequences 0.0" in text


# ------------------------------------------------------------------------------------------------
# settings and the command line

def test_settings_make_the_flags(monkeypatch, capsys):
    s = parse_settings(["--model", "m.gguf", "--max-batch", "3", "--max-tokens-limit", "99", "--threads", "2"])
    assert (s.model, s.max_batch, s.max_tokens_limit, s.threads, s.host, s.port) == ("m.gguf", 3, 99, 2, "127.0.0.1", 8080)
    assert s.served_model_name == "m" and s.api_key is None
    monkeypatch.setenv("NANOCHAT_API_KEY", "from-env")
    assert parse_settings(["--model", "m.gguf"]).api_key == "from-env"
    with pytest.raises(SystemExit):
        parse_settings(["--model", "m.gguf", "--max-queue", "0"])
    assert "--max-queue: expected a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(["--max-batch", "4"])  # --model is required
    assert "--model" in capsys.readouterr().err


def test_cli_reports_a_bad_model_file_without_traceback(tiny_gguf, tmp_path):  # noqa: F811
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[:2000])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "python"), str(REPO)])}
    r = subprocess.run([sys.executable, "-m", "nanochat.serve", "--model", str(truncated)], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "cannot load model" in r.stderr and "truncated" in r.stderr
