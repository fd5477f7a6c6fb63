"""The Django admin: who may open it, the write-only API key of a model
configuration, validation, and the conversation pages."""
import re

import pytest
from django.utils import timezone

from chat.models import Conversation, Message, ModelConfig
from tests.support.users import superuser_create, user_create

pytestmark = pytest.mark.django_db

SECRET = "sk-test-very-secret-4711"
ADD_URL = "/admin/chat/modelconfig/add/"


@pytest.fixture
def admin_client(client):
    superuser = superuser_create("root", "pw-root-123", email="root@example.com")
    client.force_login(superuser)
    return client


def model_form(**changes) -> dict:
    """A full POST body for the ModelConfig form, as the browser sends it."""
    data = {"kind": "openai", "name": "remote-gpt", "enabled": "on", "path": "",
            "base_url": "http://127.0.0.1:9/v1", "api_key": "", "frees_gpu": "on",
            "keep_alive": "300", "max_new_tokens": "512", "temperature": "0.7", "top_p": "0.95"}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def change_url(config: ModelConfig) -> str:
    return f"/admin/chat/modelconfig/{config.pk}/change/"


def test_non_staff_is_sent_to_the_admin_login(client):
    client.force_login(user_create("bob", "pw-bob-123"))
    response = client.get("/admin/")
    assert response.status_code == 302
    assert response["Location"] == "/admin/login/?next=/admin/"


def test_anonymous_is_sent_to_the_admin_login(client):
    response = client.get("/admin/")
    assert response.status_code == 302 and response["Location"] == "/admin/login/?next=/admin/"


def test_staff_can_open_the_admin(client):
    client.force_login(user_create("carol", "pw-carol-123", is_staff=True))
    response = client.get("/admin/")
    assert response.status_code == 200
    assert b"Site administration" in response.content


def test_api_key_is_write_only(admin_client):
    response = admin_client.post(ADD_URL, model_form(api_key=SECRET))
    assert response.status_code == 302, _errors(response)
    config = ModelConfig.objects.get(name="remote-gpt")
    assert (config.kind, config.api_key) == ("openai", SECRET)

    page = admin_client.get(change_url(config))
    assert page.status_code == 200
    html = page.content.decode()
    assert SECRET not in html
    assert re.search(r'<input type="password" name="api_key"[^>]*>', html)

    # Saving with the key field empty (as the form renders it) keeps the key.
    response = admin_client.post(change_url(config), model_form(temperature="0.2"))
    assert response.status_code == 302, _errors(response)
    config.refresh_from_db()
    assert (config.temperature, config.api_key) == (0.2, SECRET)

    # A new key replaces the old one.
    response = admin_client.post(change_url(config), model_form(api_key="sk-new-0815"))
    assert response.status_code == 302, _errors(response)
    config.refresh_from_db()
    assert config.api_key == "sk-new-0815"

    # Ticking "remove" clears it.
    response = admin_client.post(change_url(config), model_form(clear_api_key="on"))
    assert response.status_code == 302, _errors(response)
    config.refresh_from_db()
    assert config.api_key == ""


def test_changelist_shows_only_whether_a_key_is_set(admin_client):
    ModelConfig.objects.create(kind="openai", name="with-key", base_url="http://127.0.0.1:9/v1", api_key=SECRET)
    ModelConfig.objects.create(kind="openai", name="without-key", base_url="http://127.0.0.1:8/v1")
    response = admin_client.get("/admin/chat/modelconfig/")
    assert response.status_code == 200
    html = response.content.decode()
    assert SECRET not in html
    cells = re.findall(r'<td class="field-has_api_key">(.*?)</td>', html, re.S)
    # Ordered by kind, then name: "with-key" before "without-key".
    assert len(cells) == 2, cells
    assert 'alt="True"' in cells[0] and 'alt="False"' in cells[1]


def test_local_model_without_path_is_refused(admin_client):
    response = admin_client.post(ADD_URL, model_form(kind="local", name="my-local", base_url="", path=""))
    assert response.status_code == 200
    form = response.context["adminform"].form
    assert form.errors["path"] == ["A local model needs its model directory."]
    assert "A local model needs its model directory." in response.content.decode()
    assert not ModelConfig.objects.filter(name="my-local").exists()


def test_endpoint_without_base_url_is_refused(admin_client):
    response = admin_client.post(ADD_URL, model_form(base_url=""))
    assert response.status_code == 200
    assert response.context["adminform"].form.errors["base_url"] == ["An endpoint needs its base URL."]
    assert not ModelConfig.objects.exists()


def test_conversation_and_message_pages_load(admin_client):
    owner = user_create("dave", "pw-dave-123")
    conversation = Conversation.objects.create(user=owner, title="Admin smoke")
    now = timezone.now()
    Message.objects.create(conversation=conversation, role="user", content="hello admin", finished_at=now)
    reply = Message.objects.create(conversation=conversation, role="assistant", content="hi there",
                                   model_name="local_demo", status="done", finish_reason="stop",
                                   queued_at=now, finished_at=now)

    listing = admin_client.get("/admin/chat/conversation/")
    assert listing.status_code == 200 and b"Admin smoke" in listing.content
    detail = admin_client.get(f"/admin/chat/conversation/{conversation.pk}/change/")
    assert detail.status_code == 200
    assert b"hello admin" in detail.content and b"hi there" in detail.content
    messages = admin_client.get("/admin/chat/message/")
    assert messages.status_code == 200 and b"local_demo" in messages.content
    assert admin_client.get(f"/admin/chat/message/{reply.pk}/change/").status_code == 200


def _errors(response) -> object:
    context = response.context
    if context and "adminform" in context:
        return context["adminform"].form.errors
    return response.status_code
