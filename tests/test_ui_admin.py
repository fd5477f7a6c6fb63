"""The admin in a real browser against the real stack: model configuration
with "test connection" and the discovered models, API keys never echoed,
conversations and messages read-only with their filters."""
from __future__ import annotations

import re

import pytest
from django.utils import timezone

from chat.models import Conversation, Message, ModelConfig
from tests.support import browser as ui_support
from tests.support.users import superuser_create, user_create

expect = pytest.importorskip("playwright.sync_api").expect

SECRET = "sk-admin-ui-secret-0042"


@pytest.fixture(scope="session")
def server(request, stack, workers):
    return ui_support.live_server(request, stack)


@pytest.fixture(scope="module")
def browser(server):
    with ui_support.chromium() as chromium:
        yield chromium


@pytest.fixture
def admin_user(transactional_db):
    return superuser_create("root", "pw-root-123", email="root@example.com")


@pytest.fixture
def endpoints(stack, demo_model):
    ollama = ModelConfig.objects.create(kind="ollama", name="lab-ollama", base_url=stack.ollama.url)
    openai = ModelConfig.objects.create(kind="openai", name="lab-openai", base_url=stack.openai.url + "/v1",
                                        api_key=stack.openai.api_key)
    down = ModelConfig.objects.create(kind="openai", name="gone-openai", base_url="http://127.0.0.1:9/v1",
                                      api_key=SECRET)
    return {"local": demo_model, "ollama": ollama, "openai": openai, "down": down}


@pytest.fixture
def page(browser, server, admin_user):
    context = ui_support.logged_in_context(browser, server, admin_user, viewport={"width": 1280, "height": 900},
                                           locale="en-US")
    page = ui_support.watched_page(context)
    yield page
    context.close()
    assert page.dialogs == []
    assert page.csp_violations == []  # the admin works under the page's policy (issue 17)


def test_test_connection_lists_what_each_model_and_endpoint_offers(page, endpoints, stack):
    page.goto("/admin/chat/modelconfig/")
    page.locator("#action-toggle").check()
    page.select_option("select[name=action]", "test_connection")
    page.get_by_title("Run the selected action").click()
    notes = page.locator("ul.messagelist")
    expect(notes.locator("li.success", has_text="lab-ollama")).to_contain_text("ollama_qwen:7b")
    expect(notes.locator("li.success", has_text="lab-openai")).to_contain_text("openai_gpt-4o-mini")
    expect(notes.locator("li.success", has_text="local_demo")).to_contain_text("weight file")
    expect(notes.locator("li.error", has_text="gone-openai")).to_contain_text("does not answer")
    ui_support.screenshot(page, "admin-test-connection")
    assert SECRET not in page.content() and stack.openai.api_key not in page.content()

    # The change page lists the discovered models, and never the key.
    page.goto(f"/admin/chat/modelconfig/{endpoints['ollama'].pk}/change/")
    expect(page.locator(".field-discovered_models")).to_contain_text("ollama_qwen:7b")
    page.goto(f"/admin/chat/modelconfig/{endpoints['down'].pk}/change/")
    expect(page.locator(".field-discovered_models")).to_contain_text("does not answer")
    expect(page.locator("input[name=api_key]")).to_have_value("")
    assert SECRET not in page.content()

    # The GPU page is one click away.
    page.goto("/admin/chat/modelconfig/")
    page.get_by_role("link", name="GPU status").click()
    expect(page).to_have_url(re.compile(r"/admin/gpu/$"))
    expect(page.locator("#content-main")).to_contain_text("owner")


def test_conversations_and_messages_are_read_only_with_filters(page, admin_user):
    owner = user_create("dora", "pw-dora-123")
    conversation = Conversation.objects.create(user=owner, title="Read me only")
    now = timezone.now()
    Message.objects.create(conversation=conversation, role="user", content="question", finished_at=now)
    Message.objects.create(conversation=conversation, role="assistant", content="answer", model_name="local_demo",
                           status="done", queued_at=now, finished_at=now)

    page.goto("/admin/chat/conversation/")
    expect(page.get_by_role("link", name=re.compile("Add conversation"))).to_have_count(0)
    filters = page.locator("#changelist-filter")
    for title in ("By user", "By model name", "By status"):
        expect(filters).to_contain_text(title)
    page.get_by_role("link", name="Read me only").click()
    expect(page.locator("#content-main")).to_contain_text("answer")
    expect(page.locator("textarea, input[type=text]")).to_have_count(0)  # nothing to edit
    expect(page.get_by_role("button", name="Save")).to_have_count(0)

    page.goto("/admin/chat/message/")
    filters = page.locator("#changelist-filter")
    for title in ("By status", "By role", "By model name", "By user"):
        expect(filters).to_contain_text(title)
    filters.get_by_role("link", name="dora").click()
    expect(page.locator("#result_list tbody tr")).to_have_count(2)
    expect(page.locator("#result_list")).to_contain_text("local_demo")


def test_the_staff_pages_of_issue_17_work_under_the_content_security_policy(page, admin_user):
    """The GPU page, the audit log, an API key's form (the admin's date and
    time widgets are scripts) and the lockouts: each served with the policy
    and none refused by it (the fixture checks `page.csp_violations`)."""
    response = page.goto("/admin/gpu/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    expect(page.get_by_role("button", name="Unload local models now")).to_be_visible()
    page.get_by_role("link", name="the audit log").click()
    expect(page.locator("#content h1")).to_contain_text("audit")
    page.goto("/admin/chat/apikey/add/")
    expect(page.locator("#id_expires_at_0")).to_be_visible()
    page.locator(".datetimeshortcuts a").first.click()  # "Today": the admin's own script fills the date
    expect(page.locator("#id_expires_at_0")).not_to_have_value("")
    page.goto("/admin/axes/accessattempt/")
    expect(page.locator("#content h1")).to_be_visible()
