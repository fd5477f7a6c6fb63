"""The chat page in a real browser (Debian's chromium through Playwright)
against the real stack: the web server with the `make run` command line,
the GPU and CPU workers, Redis, and the fake Ollama. Screenshots go to
var/screenshots/.

Waits are on conditions (Playwright's expect and wait_for_*), never sleeps.
"""
from __future__ import annotations

import re

import pytest
from django.conf import settings

from chat.catalog import catalog_forget
from chat.models import Conversation, Message
from tests.support import browser as ui_support
from tests.support.waiting import wait_for

expect = pytest.importorskip("playwright.sync_api").expect

#: Milliseconds to wait for a reply: a cold GPU worker loads the demo model
#: first, and the machine may be busy with other tests.
REPLY_MS = 60_000
LONG_REPLY = " ".join(f"word{i}" for i in range(250))


@pytest.fixture(scope="session")
def server(request, stack, workers):
    return ui_support.live_server(request, stack)


@pytest.fixture(scope="module")
def browser(server):
    with ui_support.chromium() as chromium:
        yield chromium


@pytest.fixture
def demo(demo_model):
    """The demo model with shorter replies: 64 tokens still stream in many
    frames, and the browser tests do not wait for 256 on a busy CPU."""
    demo_model.max_new_tokens = 64
    demo_model.save(update_fields=["max_new_tokens"])
    catalog_forget()
    return demo_model


@pytest.fixture
def page(browser, server, user, demo):
    context = ui_support.logged_in_context(browser, server, user, viewport={"width": 1280, "height": 800},
                                           locale="en-US")
    page = ui_support.watched_page(context)
    yield page
    context.close()
    assert page.errors == [], page.errors


def open_chat(page, path: str = "/"):
    page.goto(path)
    expect(page.locator("#layout")).to_have_attribute("data-socket", "open")
    expect(page.locator("#model option[value='local_demo']")).to_have_count(1)


def send(page, text: str, model: str):
    page.select_option("#model", model)
    page.fill("#content", text)
    page.press("#content", "Enter")


def last_reply(page):
    return page.locator("li.msg.assistant").last


def wait_done(page, timeout: float = REPLY_MS):
    reply = last_reply(page)
    expect(reply.locator(".msg-actions")).to_be_visible(timeout=timeout)
    expect(reply).not_to_have_class(re.compile(r"\bstreaming\b"))
    return reply


def record_renders(page):
    """Remember every text the last reply shows, as it changes."""
    page.evaluate("""() => {
      window.__shown = [];
      new MutationObserver(() => {
        const body = [...document.querySelectorAll("li.msg.assistant .msg-body")].pop();
        if (body) window.__shown.push(body.textContent);
      }).observe(document.getElementById("messages"), {subtree: true, childList: true, characterData: true});
    }""")


def test_log_in_and_stream_from_local_demo(browser, server, user, demo):
    # Long enough to span many 40 ms frames on an idle machine too: 64 tokens
    # of the tiny model can come in two frames, with nothing to see between.
    demo.max_new_tokens = 256
    demo.save(update_fields=["max_new_tokens"])
    catalog_forget()
    context = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": 800}, locale="en-US")
    page = ui_support.watched_page(context)
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/accounts/login/"))
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("pw-alice-123")
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{server.url}/")
    open_chat(page)
    expect(page.get_by_role("heading", name="Ask anything")).to_be_visible()

    record_renders(page)
    send(page, "Tell me a story", "local_demo")
    reply = wait_done(page)
    shown = page.evaluate("window.__shown")
    final = reply.locator(".msg-body").inner_text()
    # Streamed: the reply was on screen in several growing stages before
    # it was complete, not all at once at the end.
    partial = {s for s in shown if s and final.startswith(s) and len(s) < len(final)}
    assert len(partial) >= 2, shown[:20]
    expect(reply.locator(".msg-model")).to_have_text("local_demo")
    expect(reply.locator(".msg-meta")).to_contain_text("first token")
    expect(reply.locator(".msg-meta")).to_contain_text("tokens/s")
    # The new conversation is listed, current, and the URL points at it.
    conversation = Conversation.objects.get(user=user)
    expect(page).to_have_url(f"{server.url}/c/{conversation.pk}/")
    expect(page.locator(".conv-link[aria-current='page']")).to_have_text("Tell me a story")
    ui_support.screenshot(page, "chat-desktop-en")
    context.close()
    assert page.errors == [], page.errors


def test_switch_to_ollama_changes_the_gpu_owner(page, stack):
    open_chat(page)
    send(page, "local first", "local_demo")
    wait_done(page)
    # Slots other tests left in Redis are shown too; the workers' is GPU_SLOT.
    slot = page.locator(f"#gpu-panel [data-slot='{settings.GPU_SLOT}']")
    owner = slot.locator("[data-owner]")
    expect(owner).to_have_text("local models", timeout=REPLY_MS)
    expect(page.locator("#model option[value='local_demo']")).to_contain_text("(on the GPU)", timeout=10_000)

    send(page, "now Ollama", "ollama_qwen:7b")
    reply = wait_done(page)
    expect(reply.locator(".msg-body")).to_have_text(stack.ollama.reply)
    expect(owner).to_have_text("Ollama")
    expect(page.locator("#toggle-gpu")).to_contain_text("GPU: Ollama")
    # The reply says what the switch did, with the figures.
    expect(reply.locator(".msg-steps")).to_contain_text(re.compile(r"Unloaded local_demo: freed .* in \d"))
    expect(reply.locator(".msg-steps")).to_contain_text("The GPU now belongs to Ollama")
    expect(slot.locator("[data-resident]")).to_contain_text("ollama_qwen:7b")
    expect(page.locator(".gpu-events li").first).to_contain_text("GPU handed to Ollama")
    ui_support.screenshot(page, "gpu-switch-to-ollama")


def test_stop_a_long_reply(page, stack, user):
    stack.ollama.reply = LONG_REPLY
    stack.ollama.token_delay = 0.05
    open_chat(page)
    send(page, "say a lot", "ollama_qwen:7b")
    reply = last_reply(page)
    expect(reply.locator(".msg-body")).to_contain_text("word20", timeout=REPLY_MS)
    stop = page.get_by_role("button", name="Stop")
    expect(stop).to_be_enabled()
    stop.click()
    wait_done(page)
    expect(reply.locator(".msg-meta")).to_contain_text("stopped")
    stopped = Message.objects.get(conversation__user=user, role="assistant")
    assert stopped.status == "cancelled" and stopped.finish_reason == "cancelled"
    assert 0 < len(stopped.content) < len(LONG_REPLY)
    # What the page shows is what was stored.
    assert reply.locator(".msg-body").inner_text() == stopped.content
    expect(stop).to_be_hidden()
    expect(page.get_by_role("button", name="Send")).to_be_visible()


def test_reload_shows_history_and_a_reply_still_streaming(page, stack, user):
    open_chat(page)
    send(page, "first question", "ollama_qwen:7b")
    wait_done(page)
    stack.ollama.reply = LONG_REPLY
    stack.ollama.token_delay = 0.02
    send(page, "second question", "ollama_qwen:7b")
    expect(last_reply(page).locator(".msg-body")).to_contain_text("word40", timeout=REPLY_MS)

    page.reload()
    expect(page.locator("#layout")).to_have_attribute("data-socket", "open")
    messages = page.locator("#messages > li")
    expect(messages).to_have_count(4)
    expect(messages.nth(0)).to_have_text(re.compile("first question"))
    expect(messages.nth(1).locator(".msg-body")).to_have_text("Hello from fake Ollama.")
    expect(messages.nth(2)).to_have_text(re.compile("second question"))
    # The reply that was streaming comes back from the database and goes on
    # streaming to the end, without losing or doubling a word.
    reply = messages.nth(3)
    expect(reply.locator(".msg-body")).not_to_be_empty(timeout=10_000)
    wait_done(page)
    expect(reply.locator(".msg-body")).to_have_text(LONG_REPLY)
    title = Conversation.objects.get(user=user).title
    expect(page.get_by_role("heading", level=1)).to_have_text(title)


def test_a_dropped_socket_loses_nothing(page, stack):
    sockets = []

    def proxy(ws):
        ws.connect_to_server()
        sockets.append(ws)

    page.route_web_socket(re.compile(r"/ws/chat/$"), proxy)
    stack.ollama.reply = LONG_REPLY
    stack.ollama.token_delay = 0.02
    open_chat(page)
    send(page, "keep talking", "ollama_qwen:7b")
    expect(last_reply(page).locator(".msg-body")).to_contain_text("word30", timeout=REPLY_MS)
    sockets[0].close(code=4000, reason="test drops the socket")
    expect(page.locator("#layout")).to_have_attribute("data-socket", "closed")
    expect(page.locator("#layout")).to_have_attribute("data-socket", "open", timeout=15_000)
    assert len(sockets) == 2
    reply = wait_done(page)
    expect(reply.locator(".msg-body")).to_have_text(LONG_REPLY)
    expect(page.locator("li.msg.assistant")).to_have_count(1)


def test_model_output_is_shown_as_text_and_runs_nothing(page, stack):
    stack.ollama.reply = (
        "Look: <img src=x onerror=alert(1)> and <script>window.__pwned = 1; alert(2)</script> "
        "[click](javascript:alert(3)) **bold** <b onmouseover=alert(4)>b</b>"
    )
    open_chat(page)
    send(page, "be evil", "ollama_qwen:7b")
    reply = wait_done(page)
    body = reply.locator(".msg-body")
    expect(body).to_contain_text("<img src=x onerror=alert(1)>")
    expect(body).to_contain_text("<script>window.__pwned = 1; alert(2)</script>")
    expect(body.locator("strong")).to_have_text("bold")  # Markdown still renders

    def inert():
        assert page.locator("#messages img, #messages script, #messages b").count() == 0
        assert page.locator("#messages a[href^='javascript']").count() == 0
        assert page.evaluate("window.__pwned") is None
        assert page.dialogs == []

    inert()
    page.reload()  # and from the database, the same
    expect(page.locator("li.msg.assistant .msg-body")).to_contain_text("<img src=x onerror=alert(1)>")
    inert()


def test_markdown_code_highlighting_copy_and_regenerate(page, stack, server):
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    stack.ollama.reply = (
        "## Plan\n\n1. first\n2. second\n   - nested\n\n| a | b |\n|---|--:|\n| 1 | 2 |\n\n"
        "```python\ndef f(x):\n    return x  # done\n```\n"
    )
    open_chat(page)
    send(page, "markdown please", "ollama_qwen:7b")
    reply = wait_done(page)
    body = reply.locator(".msg-body")
    expect(body.locator("h4")).to_have_text("Plan")
    expect(body.locator("ol > li")).to_have_count(2)
    expect(body.locator("ol li ul li")).to_have_text("nested")
    expect(body.locator("table td").nth(1)).to_have_text("2")
    # highlight.js (vendored, chat/static/chat/vendor/highlight/) marks the code.
    expect(body.locator("code .hljs-keyword").first).to_have_text("def")
    expect(body.locator("code .hljs-comment")).to_have_text("# done")
    ui_support.screenshot(page, "markdown-code")

    reply.locator(".md-code-copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == "def f(x):\n    return x  # done"
    reply.get_by_role("button", name="Copy", exact=True).click()
    assert page.evaluate("navigator.clipboard.readText()") == stack.ollama.reply

    stack.ollama.reply = "A second answer."
    reply.get_by_role("button", name="Regenerate").click()
    expect(page.locator("li.msg.assistant")).to_have_count(1)
    expect(last_reply(page).locator(".msg-body")).to_have_text("A second answer.", timeout=REPLY_MS)
    expect(page.locator("li.msg.user")).to_have_count(1)


def test_rename_and_delete_conversations(page, user):
    first = Conversation.objects.create(user=user, title="Trip to Hangzhou")
    Conversation.objects.create(user=user, title="Shopping list")
    open_chat(page, f"/c/{first.pk}/")
    expect(page.get_by_role("heading", level=1)).to_have_text("Trip to Hangzhou")

    page.get_by_role("button", name="Rename “Trip to Hangzhou”").click()
    title = page.get_by_role("textbox", name="New title")
    expect(title).to_be_focused()
    title.fill("Hangzhou in May")
    title.press("Enter")
    expect(page.locator(".conv-link[aria-current='page']")).to_have_text("Hangzhou in May")
    wait_for(lambda: Conversation.objects.get(pk=first.pk).title == "Hangzhou in May", what="the rename")

    page.get_by_role("button", name="Delete “Hangzhou in May”").click()
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator(".conv")).to_have_count(2)
    page.get_by_role("button", name="Delete “Hangzhou in May”").click()
    page.get_by_role("group").get_by_role("button", name="Delete", exact=True).click()
    expect(page.locator(".conv")).to_have_count(1)
    expect(page).to_have_url(re.compile(r"/$"))
    expect(page.get_by_role("heading", level=1)).to_have_text("New chat")
    assert not Conversation.objects.filter(pk=first.pk).exists()


def test_keyboard_and_phone_width(browser, server, user, demo):
    context = ui_support.logged_in_context(browser, server, user, viewport={"width": 390, "height": 844},
                                           locale="en-US", has_touch=True, is_mobile=True)
    page = ui_support.watched_page(context)
    open_chat(page)
    # Labels name the controls.
    expect(page.get_by_label("Model", exact=True)).to_be_visible()
    box = page.get_by_label("Message", exact=True)
    # Shift+Enter breaks the line, Enter sends.
    box.click()
    box.type("line one")
    box.press("Shift+Enter")
    box.type("line two")
    expect(box).to_have_value("line one\nline two")
    expect(page.locator("li.msg")).to_have_count(0)
    box.press("Enter")
    expect(box).to_have_value("")
    expect(page.locator("li.msg.user .msg-body")).to_have_text("line one\nline two")
    wait_done(page)
    # Nothing sticks out sideways at phone width.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    ui_support.screenshot(page, "chat-phone-en")

    # The conversation list is a drawer: it opens, takes focus, and Escape closes it.
    toggle = page.get_by_role("button", name="Conversations")
    expect(page.locator("#sidebar")).to_be_hidden()
    toggle.click()
    expect(page.locator("#sidebar")).to_be_visible()
    expect(page.get_by_role("button", name="New chat")).to_be_focused()
    page.keyboard.press("Escape")
    expect(page.locator("#sidebar")).to_be_hidden()
    expect(toggle).to_be_focused()
    # Tab order from the drawer toggle: the title is skipped, then GPU, then the composer.
    page.keyboard.press("Tab")
    expect(page.locator("#toggle-gpu")).to_be_focused()
    context.close()
    assert page.errors == [], page.errors


def test_chinese_interface(browser, server, user, demo, stack):
    context = ui_support.logged_in_context(browser, server, user, viewport={"width": 1280, "height": 800},
                                           locale="zh-CN")
    page = ui_support.watched_page(context)
    open_chat(page)
    expect(page.locator("html")).to_have_attribute("lang", "zh-hans")
    expect(page.get_by_role("button", name="新对话")).to_be_visible()
    expect(page.get_by_role("button", name="发送")).to_be_visible()
    expect(page.get_by_label("模型", exact=True)).to_be_visible()
    send(page, "你好，请介绍一下你自己", "ollama_qwen:7b")
    reply = wait_done(page)
    expect(reply.locator(".msg-actions")).to_contain_text("复制")
    expect(page.locator(".conv-link[aria-current='page']")).to_have_text("你好，请介绍一下你自己")
    expect(page.locator("#gpu-panel")).to_contain_text("占用者")
    ui_support.screenshot(page, "chat-desktop-zh")

    # Switching the language keeps the conversation open.
    url = page.url
    page.get_by_role("button", name="English").click()
    expect(page.locator("html")).to_have_attribute("lang", "en")
    expect(page.get_by_role("button", name="New chat")).to_be_visible()
    expect(page).to_have_url(url)
    page.get_by_role("button", name="中文").click()
    expect(page.get_by_role("button", name="新对话")).to_be_visible()

    page.set_viewport_size({"width": 390, "height": 844})
    expect(page.get_by_role("button", name="对话", exact=True)).to_be_visible()
    expect(page.locator("li.msg.assistant .msg-actions")).to_be_visible()
    expect(page.locator("#toggle-gpu")).to_contain_text("GPU：Ollama")
    ui_support.screenshot(page, "chat-phone-zh")
    page.get_by_role("button", name="对话", exact=True).click()
    expect(page.locator("#sidebar")).to_be_visible()
    ui_support.screenshot(page, "chat-phone-zh-conversations")
    context.close()
    assert page.errors == [], page.errors


def test_a_waiting_message_shows_its_place_in_the_queue(page, stack):
    open_chat(page)
    send(page, "Ollama takes the GPU", "ollama_qwen:7b")
    wait_done(page)
    # Taking the GPU back from Ollama keeps the GPU worker busy this long
    # (Ollama answers the unload at once but frees the memory later).
    stack.ollama.unload_delay = 4.0
    send(page, "local takes it back", "local_demo")
    expect(last_reply(page).locator(".msg-steps")).to_contain_text("Asking Ollama to free the GPU", timeout=REPLY_MS)
    page.get_by_role("button", name="New chat").click()
    send(page, "me too", "local_demo")
    waiting = last_reply(page)
    expect(waiting.locator(".msg-body")).to_have_text("Waiting in the queue: 1 request ahead")
    expect(page.locator(".conv .conv-busy")).to_have_count(2)
    ui_support.screenshot(page, "queue-position")
    wait_done(page)
    expect(page.locator(".conv .conv-busy")).to_have_count(0)


def test_the_picker_marks_an_endpoint_that_is_down(page, stack):
    url = stack.ollama.url
    stack.ollama.stop()
    try:
        catalog_forget()
        open_chat(page)
        down = page.locator("#model optgroup[label='Ollama'] option[data-down]")
        expect(down).to_have_text(f"unavailable: {url}")
        expect(down).to_be_disabled()
        expect(page.locator("#model optgroup[label='Local'] option[value='local_demo']")).to_be_enabled()
    finally:
        stack.ollama.start()
        catalog_forget()


def test_markdown_renderer_on_hostile_and_unfinished_input(page):
    """The renderer alone, in the page, on what a model might send."""
    open_chat(page)
    results = page.evaluate("""async () => {
      const { renderMarkdown } = await import("/static/chat/markdown.js");
      const render = (text) => { const div = document.createElement("div"); div.append(renderMarkdown(text)); return div; };
      const out = {};
      let d = render("[x](javascript:alert(1)) [y](data:text/html,hi) [z](https://example.com/a?b=1)");
      out.links = [...d.querySelectorAll("a")].map((a) => a.href);
      out.linkText = d.textContent;
      d = render("![cat](http://example.com/cat.png)");
      out.images = d.querySelectorAll("img").length;
      out.imageLink = d.querySelector("a").href;
      d = render("snake_case_name and *em* and **strong** and ~~gone~~ and `<b>code</b>`");
      out.inline = [...d.querySelectorAll("em, strong, del, code")].map((n) => n.tagName + ":" + n.textContent);
      d = render("```js\\nconst a = '<script>';\\n");  // a fence still streaming
      out.openFence = d.querySelector("pre code").textContent;
      out.fenceKeyword = d.querySelector(".hljs-keyword").textContent;
      // One grammar per language: `func` is a keyword in Go, a name in C;
      // `fn` a keyword in Rust only.
      const keywords = (text) => [...render(text).querySelectorAll("code .hljs-keyword")].map((n) => n.textContent);
      out.goKeywords = keywords("```go\\nfunc main() { defer f() }\\n```");
      out.cKeywords = keywords("```c\\nint func(void) { return 0; }\\n```");
      out.rustKeywords = keywords("```rs\\nfn main() { let x = 1; }\\n```");
      out.javaKeywords = keywords("```java\\nfn func = defer;\\n```");
      // Markup in highlighted code stays text; only hljs spans are made.
      d = render("```html\\n\\n  <img src=x onerror=\\"window.__pwned = 1\\"><script>alert(3)</script>\\n```");
      out.htmlCode = d.querySelector("pre code").textContent;
      out.htmlTags = [...new Set([...d.querySelectorAll("pre code *")].map((n) => n.tagName))];
      out.htmlClasses = [...d.querySelectorAll("pre code *")].every((n) => /^(hljs|language)-/.test(n.className));
      out.plain = render("```nosuchlanguage\\nfunc <b>x</b>\\n```").querySelector("pre code").innerHTML;
      const started = performance.now();
      render("*a ".repeat(20000) + "_".repeat(20000) + "[".repeat(5000));
      out.hostileMs = performance.now() - started;
      d = render("> quoted <i>x</i>\\n> more\\n\\n- a\\n  - b\\n    - c\\n\\n3. three\\n4. four");
      out.quote = d.querySelector("blockquote").textContent;
      out.nested = d.querySelectorAll("ul ul ul li").length;
      out.start = d.querySelector("ol").start;
      out.elements = [...d.querySelectorAll("*")].map((n) => n.tagName).filter((t) => !["BLOCKQUOTE", "P", "BR", "UL", "OL", "LI"].includes(t));
      return out;
    }""")
    assert results["links"] == ["https://example.com/a?b=1"]
    assert results["linkText"] == "x y z"
    assert results["images"] == 0 and results["imageLink"] == "http://example.com/cat.png"
    assert results["inline"] == ["EM:em", "STRONG:strong", "DEL:gone", "CODE:<b>code</b>"]
    assert results["openFence"] == "const a = '<script>';"
    assert results["fenceKeyword"] == "const"
    assert "func" in results["goKeywords"] and "defer" in results["goKeywords"]
    assert "func" not in results["cKeywords"] and "return" in results["cKeywords"]
    assert "fn" in results["rustKeywords"] and "let" in results["rustKeywords"]
    assert not {"fn", "func", "defer"} & set(results["javaKeywords"])
    assert results["htmlCode"] == '\n  <img src=x onerror="window.__pwned = 1"><script>alert(3)</script>'
    assert results["htmlTags"] == ["SPAN"] and results["htmlClasses"]
    assert results["plain"] == "func &lt;b&gt;x&lt;/b&gt;"
    assert results["hostileMs"] < 2000, results["hostileMs"]
    assert results["quote"] == "quoted <i>x</i>more"
    assert results["nested"] == 1 and results["start"] == 3
    assert results["elements"] == []


def test_the_content_security_policy_refuses_inline_script(page):
    """The policy is enforced as served, and a violation reaches the test:
    a script element with inline text (what an injection into the page
    would add) neither runs nor passes unseen. Every other browser test
    fails on any violation (tests/support/browser.py watched_page)."""
    open_chat(page)
    assert page.csp_violations == []
    page.evaluate("""() => {
      const script = document.createElement("script");
      script.textContent = "window.__injected = true";
      document.body.append(script);
    }""")
    page.wait_for_function("() => window.__cspViolations.length > 0", timeout=10_000)
    assert [v["directive"] for v in page.csp_violations] == ["script-src-elem"]
    assert page.evaluate("() => window.__injected") is None
    page.errors.clear()  # the violation and Chromium's console line for it: expected here, and only here
