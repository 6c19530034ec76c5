"""The web chat page in headless Chromium: type a message, press Send, watch the reply stream in.

Drives Debian's `chromium` with Playwright against the real server (tests/fixtures_model.py). The
page must show the same reply the API gives for the same greedy request, delivered in several
pieces (it streams); an error (a message too long for the context) must show the server's message
and leave the conversation usable; the next message must carry the conversation so far.
Skipped only when chromium is not installed (`scripts/setup.sh --test` installs it).

    .venv/bin/python -m pytest tests/test_serve_browser.py -q
"""

from __future__ import annotations

import shutil

import httpx
import pytest

from tests.fixtures_model import running_server, tiny_gguf  # noqa: F401 - the fixture is used by name

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                "(apt-get install chromium, or scripts/setup.sh --test)")
REPLY_TOKENS = 12


@pytest.fixture(scope="module")
def server(tiny_gguf):  # noqa: F811
    with running_server(tiny_gguf, "--threads", "1") as url:
        yield url


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser.new_page()
        browser.close()


def api_reply(url: str, messages: list[dict]) -> str:
    r = httpx.post(url + "/v1/chat/completions", timeout=60,
                   json={"messages": messages, "max_tokens": REPLY_TOKENS, "temperature": 0})
    return r.json()["choices"][0]["message"]["content"]


def test_chat_page_streams_a_reply(server, page):
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(REPLY_TOKENS))

    page.fill("#prompt", "hello, who are you?")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-state=done]').length == 1", timeout=60_000)
    reply = page.locator(".msg.assistant").nth(0)
    want = api_reply(server, [{"role": "user", "content": "hello, who are you?"}])
    assert reply.text_content() == want
    assert int(reply.get_attribute("data-chunks")) >= 2  # arrived in pieces, not all at once
    assert page.locator(".msg.user").nth(0).text_content() == "hello, who are you?"
    assert page.locator(".msg.error").count() == 0

    # a message too long for the context shows the server's error, and is dropped from the conversation
    page.fill("#prompt", "word " * 600)
    page.click("#send")
    page.locator(".msg.error").wait_for(timeout=60_000)
    assert "context" in page.locator(".msg.error").text_content()

    # the next turn sends the conversation so far (without the failed turn)
    page.fill("#prompt", "and then?")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-state=done]').length == 2", timeout=60_000)
    second = page.locator(".msg.assistant").nth(1)
    want = api_reply(server, [{"role": "user", "content": "hello, who are you?"},
                              {"role": "assistant", "content": reply.text_content()},
                              {"role": "user", "content": "and then?"}])
    assert second.text_content() == want
