"""The chat page and claude-stream.js in a real headless Chromium (Debian's, driven by
Playwright; nothing downloads a browser), against a real Hypercorn and the emulator."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from example_app import create_app as create_example_app
from quart_claude.testing import Emulator, ErrorReply, Reply, ToolUse

from . import binaries
from .conftest import API_KEY
from .helpers import CuttingProxy, serving

pytestmark = pytest.mark.system

DOCS = Path(__file__).resolve().parent.parent / "docs"
ANSWER = " ".join(f"word{i}" for i in range(60)) + "."

try:
    from playwright.async_api import Page, async_playwright
except ImportError:  # pragma: no cover - the dev lock installs it
    async_playwright = None  # type: ignore[assignment]


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    chromium = binaries.need("chromium")
    assert async_playwright is not None, "playwright is in the dev lock: make install"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            context = await browser.new_context(viewport={"width": 900, "height": 700})
            yield await context.new_page()
        finally:
            await browser.close()


@pytest.fixture
async def site(emulator: Emulator) -> AsyncIterator[str]:
    app = create_app(api_key=API_KEY, base_url=emulator.url, retry_base_delay=0.05)
    async with serving(app) as url:
        yield url


async def ask(page: Page, url: str, message: str = "hi") -> None:
    await page.goto(url + "/")
    await page.fill("#input", message)
    await page.press("#input", "Enter")  # Enter sends


async def reply_text(page: Page) -> str:
    return await page.locator(".assistant .body").last.inner_text()


async def wait_until(page: Page, script: str, within_ms: float = 10_000) -> Any:
    return await page.wait_for_function(script, timeout=within_ms)


MARKDOWN = (
    "Streaming works like this:\n\n"
    "- Claude sends each **token** as it is generated;\n"
    "- the relay turns each into one `delta` event;\n"
    "- this page renders them as they arrive, *safely*.\n\n"
    "```python\nasync for event in stream_chat(url, message='hi'):\n    print(event)\n```\n\n"
    "A dropped connection resumes with `Last-Event-ID`, so nothing is lost or repeated."
)


async def test_the_reply_appears_progressively(page: Page, site: str, emulator: Emulator) -> None:
    emulator.script(Reply(MARKDOWN, token_delay=0.08))  # ~4 s of tokens
    await ask(page, site)
    lengths = []
    for _ in range(6):
        await asyncio.sleep(0.4)
        lengths.append(len(await reply_text(page)))
    still_sending = not emulator.requests[0].ended.is_set()
    assert still_sending
    assert lengths[0] < lengths[2] < lengths[5]  # grew while the emulator was still sending
    shot = DOCS / "chat-page.png"
    if os.environ.get("QUART_CLAUDE_SCREENSHOT") == "1":  # `make screenshot`
        await page.screenshot(path=str(shot))
    await wait_until(page, "!document.querySelector('#send').disabled")
    body = page.locator(".assistant .body").last
    assert await body.locator("li").count() == 3 and await body.locator("pre").count() == 1
    assert "Last-Event-ID" in await reply_text(page)
    meta = await page.locator(".assistant .meta").last.inner_text()
    assert "tokens in" in meta and "end_turn" not in meta


async def test_stop_halts_the_reply_and_the_upstream(
    page: Page, site: str, emulator: Emulator
) -> None:
    emulator.script(Reply(ANSWER, token_delay=0.1))
    await ask(page, site)
    await wait_until(page, "document.querySelector('.assistant .body').innerText.length > 20")
    await page.click("#stop")
    upstream = emulator.requests[0]
    await asyncio.wait_for(upstream.ended.wait(), 5)
    assert upstream.disconnected  # the emulator saw the upstream request closed
    await wait_until(page, "!document.querySelector('#send').disabled")
    assert "stopped" in await page.locator(".assistant .meta").last.inner_text()
    assert len(await reply_text(page)) < len(ANSWER)


async def test_a_cut_mid_reply_resumes_and_the_text_is_exact(
    page: Page, site: str, emulator: Emulator
) -> None:
    emulator.script(Reply(ANSWER, token_delay=0.05))
    port = int(site.rsplit(":", 1)[1])
    async with CuttingProxy(port) as proxy:
        await ask(page, f"http://127.0.0.1:{proxy.port}")
        await wait_until(page, "document.querySelector('.assistant .body').innerText.length > 40")
        proxy.cut()  # the network blips mid-reply
        await wait_until(page, "!document.querySelector('#send').disabled", 20_000)
    assert await reply_text(page) == ANSWER  # exact, and said once
    assert proxy.connections >= 2
    assert len(emulator.requests) == 1  # resumed, not asked again


async def test_a_cut_before_the_first_event_resumes_from_the_start(
    page: Page, site: str, emulator: Emulator
) -> None:
    # the relay waits out a 429 before any event; the connection is cut meanwhile, so the
    # page resumes with Last-Event-ID: -1
    emulator.script(ErrorReply(429, headers={"retry-after": "1"}), Reply(ANSWER))
    port = int(site.rsplit(":", 1)[1])
    async with CuttingProxy(port) as proxy:
        await ask(page, f"http://127.0.0.1:{proxy.port}")
        await emulator.wait_for_requests(1)
        await asyncio.sleep(0.3)
        proxy.cut()
        await wait_until(page, "!document.querySelector('#send').disabled", 20_000)
    assert await reply_text(page) == ANSWER
    assert len(emulator.requests) == 2  # the 429, then the one answer


async def test_a_rate_limit_shows_a_readable_error_with_when_to_retry(
    page: Page, emulator: Emulator
) -> None:
    emulator.script(ErrorReply(429, headers={"retry-after": "30"}))
    app = create_app(api_key=API_KEY, base_url=emulator.url, max_retries=0)
    async with serving(app) as url:
        await ask(page, url)
        error = page.locator(".assistant .error")
        await error.wait_for(timeout=10_000)
        text = await error.inner_text()
    assert "too many requests" in text.lower() and "30 s" in text


async def test_model_html_is_shown_as_text(page: Page, site: str, emulator: Emulator) -> None:
    hostile = (
        'Look: <script>window.pwned = 1</script> <img src=x onerror="window.pwned = 2"> **bold**'
    )
    emulator.script(Reply(hostile))
    await ask(page, site)
    await wait_until(page, "!document.querySelector('#send').disabled")
    body = page.locator(".assistant .body").last
    text = await body.inner_text()
    assert "<script>window.pwned = 1</script>" in text and "<img src=x" in text
    assert await body.locator("script, img").count() == 0
    assert await body.locator("strong").inner_text() == "bold"  # Markdown still renders
    assert await page.evaluate("window.pwned === undefined")


async def test_a_reload_keeps_the_conversation_and_resumes_the_reply(
    page: Page, site: str, emulator: Emulator
) -> None:
    emulator.script(Reply(ANSWER, token_delay=0.05))
    await ask(page, site)
    await wait_until(page, "document.querySelector('.assistant .body').innerText.length > 40")
    await page.reload()
    await wait_until(page, "!document.querySelector('#send').disabled", 20_000)
    assert await page.locator(".user").first.inner_text() == "hi"
    assert await reply_text(page) == ANSWER
    assert len(emulator.requests) == 1


async def test_the_client_script_is_served_by_the_blueprint() -> None:
    # (async, on the test's loop: asyncio.run() in a test would orphan pytest-asyncio's loop)
    app = create_app(api_key=API_KEY, base_url="http://127.0.0.1:1", url_prefix="/ai")
    response = await app.test_client().get("/ai/claude-stream.js")
    assert response.status_code == 200 and "javascript" in (response.content_type or "")
    assert "ClaudeStream" in await response.get_data(True)


async def test_thinking_shows_collapsed_above_the_reply(page: Page, emulator: Emulator) -> None:
    emulator.script(
        Reply("The answer is 4.", thinking="Two plus two <b>is</b> four.", token_delay=0.02)
    )
    app = create_app(api_key=API_KEY, base_url=emulator.url, thinking=1024)
    async with serving(app) as url:
        await ask(page, url, "What is 2 + 2?")
        await wait_until(page, "!document.querySelector('#send').disabled")
        thinking = page.locator(".assistant .thinking").last
        assert await thinking.get_attribute("open") is None  # collapsed
        assert await thinking.locator("div").text_content() == "Two plus two <b>is</b> four."
        assert await thinking.locator("b").count() == 0  # text, never markup
        assert await reply_text(page) == "The answer is 4."
        # above the reply
        assert await page.evaluate(
            "(() => { const t = document.querySelector('.assistant .thinking');"
            " return !!(t.compareDocumentPosition(t.parentElement.querySelector('.body'))"
            " & Node.DOCUMENT_POSITION_FOLLOWING); })()"
        )


async def test_tool_calls_show_inline_between_the_texts(page: Page, emulator: Emulator) -> None:
    emulator.script(
        Reply(
            "Let me look. ",
            tool_calls=[ToolUse("order_status", {"order_id": "<i>A-17</i>"})],
            token_delay=0.01,
        ),
        Reply("It has **shipped**.", token_delay=0.01),
    )
    app = create_app(api_key=API_KEY, base_url=emulator.url)
    async with serving(app) as url:
        await ask(page, url, "Where is my order?")
        await wait_until(page, "!document.querySelector('#send').disabled")
        turn = page.locator(".assistant").last
        bodies = await turn.locator(".body").all_inner_texts()
        assert bodies == ["Let me look.", "It has shipped."]
        tool = turn.locator(".tool")
        assert await tool.count() == 1
        shown = await tool.text_content() or ""
        assert 'order_status({"order_id":"<i>A-17</i>"})' in shown  # text, never markup
        assert await tool.locator("i").count() == 0
        assert '"status":"shipped"' in (await tool.locator(".result").text_content() or "")
        # in order: text, the call, the text after it
        assert (
            await page.evaluate(
                "(() => { const t = [...document.querySelectorAll('.assistant')].pop();"
                " return [...t.children].map(c => c.className).join(' '); })()"
            )
            == "body tool body meta"
        )


async def test_sources_show_under_the_answer(page: Page, site: str, emulator: Emulator) -> None:
    """Citations (protocol v1.2) as a list under the reply: each page once, a link only for
    http(s) URLs, titles as text."""
    web = {
        "type": "web_search_result_location",
        "url": "https://example.com/ginza",
        "title": "Apple Ginza <b>reopens</b>",
        "cited_text": "Apple Ginza now returns",
        "encrypted_index": "x",
    }
    hostile = {**web, "url": "javascript:window.pwned=1", "title": "click me"}
    emulator.script(Reply("Apple Ginza reopened.", citations=[web, web, hostile]))
    await ask(page, site)
    await wait_until(page, "!document.querySelector('#send').disabled")
    items = page.locator(".assistant .sources li")
    assert await items.all_inner_texts() == ["Apple Ginza <b>reopens</b>", "click me"]
    links = page.locator(".assistant .sources a")
    assert await links.count() == 1
    assert await links.first.get_attribute("href") == "https://example.com/ginza"
    assert await page.locator(".assistant .sources b").count() == 0


# -- conversations the server keeps (issue 23) ----------------------------------------------


@pytest.fixture
async def chat_site(emulator: Emulator, tmp_path: Path) -> AsyncIterator[str]:
    """The example page with conversations in SQLite and no auth: the anonymous cookie."""
    app = create_app(
        api_key=API_KEY,
        base_url=emulator.url,
        retry_base_delay=0.05,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'page.db'}",
    )
    async with serving(app) as url:
        yield url


def create_app(**options: Any) -> Any:
    """``example_app.create_app``, with a SECRET_KEY when conversations are on."""
    from quart import Quart

    from example_app import order_status, page
    from quart_claude import Claude

    if "database_url" not in options:
        return create_example_app(**options)
    app = Quart(__name__)
    app.config["SECRET_KEY"] = "a-secret-key-for-the-page-tests"
    claude = Claude(app, **options)
    claude.tool(order_status)
    html = page(False, "", True)

    @app.get("/")
    async def index() -> str:
        return html

    return app


async def messages_shown(page: Page) -> list[str]:
    return [text.strip() for text in await page.locator("#log .turn .body").all_inner_texts()]


async def settled(page: Page) -> None:
    """The reply ended and the page read the stored conversation back."""
    await wait_until(page, "document.querySelector('#log').dataset.state === 'ready'")


async def test_a_conversation_is_listed_renamed_reloaded_and_deleted(
    page: Page, chat_site: str, emulator: Emulator
) -> None:
    emulator.script(Reply("First answer."), Reply("Second answer."))
    await ask(page, chat_site, "my first question")
    await settled(page)
    await page.fill("#input", "a follow-up")
    await page.press("#input", "Enter")
    await settled(page)
    assert "#c=" in page.url
    assert await page.locator("#chat-list li").count() == 1
    assert await page.locator("#chat-list li .open").inner_text() == "my first question"
    await page.reload()  # from the server, not the browser
    await settled(page)
    assert await messages_shown(page) == [
        "my first question",
        "First answer.",
        "a follow-up",
        "Second answer.",
    ]
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept("Renamed chat")))
    await page.click("#chat-list li .rename")
    await wait_until(
        page, "document.querySelector('#chat-list li .open').innerText === 'Renamed chat'"
    )
    await page.click("#new-chat")
    await wait_until(page, "document.querySelectorAll('#log .turn').length === 0")
    assert "#c=" not in page.url
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await page.click("#chat-list li .delete")
    await wait_until(page, "document.querySelectorAll('#chat-list li').length === 0")


async def test_a_reload_mid_reply_resumes_the_streaming_turn(
    page: Page, chat_site: str, emulator: Emulator
) -> None:
    emulator.script(Reply(ANSWER, token_delay=0.05))
    await ask(page, chat_site, "tell me")
    await wait_until(page, "location.hash.startsWith('#c=')")
    await wait_until(page, "document.querySelector('.assistant .body')?.innerText.length > 20")
    await page.reload()
    await wait_until(page, f"document.querySelector('.assistant .body')?.innerText === {ANSWER!r}")
    await settled(page)
    assert await messages_shown(page) == ["tell me", ANSWER]
    assert len(emulator.requests) == 1  # resumed, never asked again


async def test_edit_regenerate_and_switching_branches(
    page: Page, chat_site: str, emulator: Emulator
) -> None:
    emulator.script(Reply("Answer one."), Reply("Answer edited."), Reply("Answer regenerated."))
    await ask(page, chat_site, "original question")
    await settled(page)
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept("edited question")))
    await page.click("#log .user .controls .edit")
    await settled(page)
    assert await messages_shown(page) == ["edited question", "Answer edited."]
    assert await page.locator("#log .user .position").inner_text() == "2/2"
    await page.click("#log .assistant .controls .regenerate")
    await settled(page)
    assert await messages_shown(page) == ["edited question", "Answer regenerated."]
    assert await page.locator("#log .assistant .position").inner_text() == "2/2"
    await page.click("#log .user .controls .previous")  # back to the first branch
    await settled(page)
    assert await messages_shown(page) == ["original question", "Answer one."]
    await page.reload()  # the switch is the conversation's current branch now
    await settled(page)
    assert await messages_shown(page) == ["original question", "Answer one."]


async def test_the_page_shows_the_budget_left_and_a_cut_answer(
    page: Page, emulator: Emulator
) -> None:
    # the example's tool adds the API's tool-use prompt (346 tokens) to each input estimate
    app = create_example_app(api_key=API_KEY, base_url=emulator.url, budget="1000 tokens/day")
    emulator.script(
        Reply("one two three four five", input_tokens=20),
        Reply(tokens=[f"w{n} " for n in range(1000)], input_tokens=20),
    )
    async with serving(app) as url:
        await page.goto(url + "/")
        await wait_until(page, "!document.querySelector('#budget').hidden")
        assert await page.inner_text("#budget") == "Budget: 1000 tokens left of 1000 tokens/day"
        await page.fill("#input", "hi")
        await page.press("#input", "Enter")
        await wait_until(page, "document.querySelector('#budget').dataset.left === '975'")
        await page.fill("#input", "more")
        await page.press("#input", "Enter")
        await wait_until(page, "document.querySelector('#budget').dataset.left !== '975'")
        meta = await page.locator(".assistant .meta").last.inner_text()
    assert "your budget ran out" in meta
