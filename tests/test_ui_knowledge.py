"""Knowledge bases and translation on the chat page (issue 15; CONTRACT
§8, §9), in a real browser against the real stack, in English and in
Chinese: a base made from uploaded files and watched until it is indexed,
picked for a question, the reply's sources and citations (again after a
reload), a message translated, and a file that cannot be read shown with
its own error. Screenshots go to var/screenshots/.

The demo translator (`translate_demo`) is a tiny random model: its output
is gibberish, so the tests check that a translation appears, labelled,
never its words. Waits are on conditions (Playwright's expect), never
sleeps.
"""
from __future__ import annotations

import re

import pytest

from tests.support import browser as ui_support
from tests.test_ui_chat import REPLY_MS, demo, open_chat, send, wait_done  # noqa: F401 (a fixture)

expect = pytest.importorskip("playwright.sync_api").expect

#: Milliseconds for a base to be indexed: the knowledge worker loads the
#: demo embedder first, and the machine may be busy with other tests.
INDEX_MS = 60_000

ETNA = ("# Mount Etna\n\nMount Etna is an active stratovolcano on the east coast of Sicily, Italy. "
        "It is the tallest active volcano in Europe outside the Caucasus.\n")
FUJI = "Mount Fuji is the highest mountain in Japan. It last erupted in 1707.\n"
YANGTZE = "长江是中国第一长河，全长约六千三百公里，流经青海、西藏、四川、重庆、湖北和上海等地。\n"
TEA = "龙井茶产于浙江杭州西湖一带，是中国著名的绿茶。\n"
NOT_A_PDF = b"%PDF-1.4\nthis is not a PDF at all"

#: What each language's page says, for the selectors and the checks.
LANGUAGES = {
    "en": {
        "locale": "en-US", "new": "New knowledge base", "name": "Name", "files": "Files", "create": "Create",
        "ready": re.compile(r"^Ready · 2 documents · \d+ chunks$"), "picked": "Answers will use: {}",
        "sources": "Sources", "source": "Source 1: ", "delete": "Delete", "cancel": "Cancel",
        "delete_base": "Delete “{}”", "failed_files": "1 failed",
        # The reply goes into the other language, the question into this one's.
        "reply_target": ("Translate into Chinese", "Chinese translation"), "question_target": "Translate into English",
        "base": "Volcanoes", "documents": {"etna.md": ETNA, "fuji.txt": FUJI},
        "question": "Where is Mount Etna?", "cited": "Mount Etna is on Sicily [1].",
    },
    "zh-hans": {
        "locale": "zh-CN", "new": "新建知识库", "name": "名称", "files": "文件", "create": "创建",
        "ready": re.compile(r"^就绪 · 2 个文档 · \d+ 个片段$"), "picked": "回答将参考：{}",
        "sources": "来源", "source": "来源 1：", "delete": "删除", "cancel": "取消",
        "delete_base": "删除“{}”", "failed_files": "1 个失败",
        "reply_target": ("翻译成英文", "译文（英文）"), "question_target": "翻译成中文",
        "base": "中国常识", "documents": {"长江.md": YANGTZE, "龙井.txt": TEA},
        # A model writing Chinese may cite with full-width brackets.
        "question": "长江有多长？", "cited": "长江全长约六千三百公里【1】。",
    },
}


@pytest.fixture(scope="module")
def server(request, stack, workers):
    return ui_support.live_server(request, stack)


@pytest.fixture(scope="module")
def browser(server):
    with ui_support.chromium() as chromium:
        yield chromium


@pytest.fixture(params=list(LANGUAGES))
def page(request, browser, server, user, demo, demo_engines):  # noqa: F811 (the fixture)
    """The chat page in each language, `page.words` what it says."""
    context = ui_support.logged_in_context(browser, server, user, viewport={"width": 1280, "height": 900},
                                           locale=LANGUAGES[request.param]["locale"])
    page = ui_support.watched_page(context)
    page.words = LANGUAGES[request.param]
    page.lang = request.param
    yield page
    page.context.close()
    assert page.errors == [], page.errors
    assert page.dialogs == [], page.dialogs


def upload(name: str, text: str | bytes) -> dict:
    mime = {"md": "text/markdown", "txt": "text/plain", "pdf": "application/pdf"}[name.rsplit(".", 1)[1]]
    return {"name": name, "mimeType": mime, "buffer": text.encode() if isinstance(text, str) else text}


def create_base(page, name: str, files: dict) -> object:
    """Make a base from the panel's form; its item in the list."""
    w = page.words
    page.locator("#knowledge summary", has_text=w["new"]).click()
    page.get_by_label(w["name"], exact=True).fill(name)
    page.get_by_label(w["files"], exact=True).set_input_files([upload(n, t) for n, t in files.items()])
    page.get_by_role("button", name=w["create"], exact=True).click()
    base = page.locator("li.kb", has=page.get_by_role("checkbox", name=name, exact=True))
    expect(base).to_have_count(1)
    return base


def sources_of(page, reply):
    return reply.get_by_role("region", name=page.words["sources"], exact=True)


def test_a_base_answers_with_sources_and_citations_and_messages_translate(page, stack, user):
    w = page.words
    open_chat(page)
    base = create_base(page, w["base"], w["documents"])
    # Indexing shows its progress, then the base is ready and can be picked.
    pick = page.get_by_role("checkbox", name=w["base"], exact=True)
    expect(pick).to_be_enabled(timeout=INDEX_MS)
    expect(base).to_have_attribute("data-status", "ready")
    expect(base.locator(".kb-status")).to_have_text(w["ready"])
    expect(base.locator(".kb-progress")).to_have_count(0)
    pick.check()
    expect(page.locator("#knowledge-picked")).to_have_text(w["picked"].format(w["base"]))

    # A local model's reply shows the passages it was given, numbered,
    # each with its document's name.
    send(page, w["question"], "local_demo")
    reply = wait_done(page)
    sources = sources_of(page, reply)
    expect(sources).to_be_visible()
    expect(sources.get_by_role("heading")).to_have_text(w["sources"])
    expect(sources.locator("li").first.locator(".msg-source-n")).to_have_text("[1]")
    names = sources.locator(".msg-source-doc").all_inner_texts()
    assert names and set(names) <= set(w["documents"]), names

    # An Ollama model's reply (through the fake) with a citation: the mark
    # leads to its source.
    stack.ollama.reply = w["cited"]
    send(page, w["question"], "ollama_qwen:7b")
    cited = wait_done(page)
    mark = cited.locator(".msg-body a.cite")
    expect(mark).to_have_text("1")
    expect(mark).to_have_attribute("aria-label", re.compile("^" + re.escape(w["source"])))
    expect(cited.locator(".msg-body")).not_to_contain_text("[1]")
    expect(cited.locator(".msg-body")).not_to_contain_text("【1】")
    mark.click()
    expect(sources_of(page, cited).locator("li").first).to_be_focused()
    ui_support.screenshot(page, f"knowledge-sources-{page.lang}")

    # The reply translated into the other language: labelled, under it; asked once.
    button_name, label = w["reply_target"]
    button = cited.get_by_role("button", name=button_name, exact=True)
    button.click()
    translation = cited.locator(".msg-translation")
    expect(translation.locator(".msg-translation-lang")).to_have_text(label, timeout=REPLY_MS)
    expect(translation.locator(".msg-translation-engine")).to_contain_text("translate_demo")
    expect(translation.locator(".msg-body")).not_to_be_empty()
    expect(button).to_be_disabled()
    # The question too (its id is known once its reply has ended).
    question = page.locator("li.msg.user").last
    question.get_by_role("button", name=w["question_target"], exact=True).click()
    expect(question.locator(".msg-translation .msg-body")).not_to_be_empty(timeout=REPLY_MS)
    ui_support.screenshot(page, f"knowledge-translation-{page.lang}")

    # A reload shows the sources, the citation and the translations again, from the database.
    page.reload()
    expect(page.locator("#layout")).to_have_attribute("data-socket", "open")
    replies = page.locator("li.msg.assistant")
    expect(replies).to_have_count(2)
    expect(sources_of(page, replies.nth(0)).locator("li")).to_have_count(len(names))
    expect(replies.nth(1).locator(".msg-body a.cite")).to_have_text("1")
    expect(replies.nth(1).locator(".msg-translation .msg-translation-lang")).to_have_text(label)
    expect(page.locator("li.msg.user").last.locator(".msg-translation .msg-body")).not_to_be_empty()
    expect(replies.nth(1).get_by_role("button", name=button_name, exact=True)).to_be_disabled()


def test_a_file_that_cannot_be_read_shows_its_error_and_a_base_takes_more_files(page):
    w = page.words
    open_chat(page)
    name, text = next(iter(w["documents"].items()))
    base = create_base(page, "mixed", {name: text, "broken.pdf": NOT_A_PDF})
    # The readable file is indexed; the other one says why it is not.
    expect(base.locator(".kb-files summary")).to_contain_text(w["failed_files"], timeout=INDEX_MS)
    failed = base.locator(".kb-file[data-status='error']")
    expect(failed.locator(".kb-file-name")).to_have_text("broken.pdf")
    expect(failed.locator(".kb-file-state")).to_contain_text("not a readable PDF")
    expect(base.locator(".kb-file[data-status='ready'] .kb-file-name")).to_have_text(name)
    ui_support.screenshot(page, f"knowledge-file-error-{page.lang}")

    # More files for the same base: indexed in turn, the others kept.
    extra, extra_text = list(w["documents"].items())[1]
    base.locator("input[type='file']").set_input_files([upload(extra, extra_text)])
    expect(base.locator(".kb-file[data-status='ready'] .kb-file-name")).to_have_text([name, extra], timeout=INDEX_MS)
    expect(base).to_have_attribute("data-status", "ready")

    # Deleting asks first; Cancel keeps the base.
    page.get_by_role("button", name=w["delete_base"].format("mixed"), exact=True).click()
    page.locator(".kb-confirm").get_by_role("button", name=w["cancel"], exact=True).click()
    expect(page.locator("li.kb")).to_have_count(1)
    page.get_by_role("button", name=w["delete_base"].format("mixed"), exact=True).click()
    page.locator(".kb-confirm").get_by_role("button", name=w["delete"], exact=True).click()
    expect(page.locator("li.kb")).to_have_count(0)
