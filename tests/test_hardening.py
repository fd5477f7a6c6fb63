"""The production posture (issue 17), in-process: password guessing locked
out per account and per address with a cool-down, staff unlocking it; API
keys revoked, expired and throttled; the page's security headers and its
Content-Security-Policy; the audit log of staff actions; a quiet /readyz.

Covered elsewhere:
- `check --deploy` with the compose web service's environment, and the
  proxy in front: tests/test_deploy.py;
- the policy enforced in a real browser with no violation: every browser
  test (tests/support/browser.py `watched_page`), and an injected inline
  script refused: tests/test_ui_chat.py
  (test_the_content_security_policy_refuses_inline_script);
- a GPU action through the real worker leaves its audit entry:
  tests/test_admin_gpu.py.
"""
from __future__ import annotations

import logging
import re
import uuid
from datetime import timedelta
from types import SimpleNamespace

import pytest
from axes.models import AccessAttempt
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from chat import views
from chat.api.keys import api_key_create
from chat.models import ApiKey, AuditEntry, ModelConfig
from tests.support import ROOT
from tests.support.users import superuser_create, user_create
from tests.support.waiting import wait_for
from tests.test_admin import model_form

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "pw-alice-123"
#: Short, so that a test waits seconds for the cool-down, not minutes.
COOLOFF = timedelta(seconds=2)


@pytest.fixture
def lockout(settings):
    settings.AXES_FAILURE_LIMIT = 3
    settings.AXES_COOLOFF_TIME = COOLOFF
    return settings


def login(client: Client, url: str, username: str, password: str):
    return client.post(url, {"username": username, "password": password, "next": "/"})


def logged_in(response) -> bool:
    return response.status_code == 302


# --- password guessing (django-axes) ----------------------------------------------

@pytest.mark.parametrize("url", ["/accounts/login/", "/admin/login/"])
def test_wrong_passwords_lock_the_account_even_for_the_right_one_until_the_cool_down(lockout, url):
    alice = user_create("alice", PASSWORD, is_staff=True)
    client = Client()
    for _ in range(lockout.AXES_FAILURE_LIMIT - 1):
        assert login(client, url, "alice", "wrong").status_code == 200  # the form again, with its error
    locked = login(client, url, "alice", "wrong")
    assert locked.status_code == 429, locked.content
    assert b"Too many attempts" in locked.content and b"even the right password is refused" in locked.content

    refused = login(client, url, "alice", PASSWORD)
    assert refused.status_code == 429 and "_auth_user_id" not in client.session
    # From another address too: the lockout is the account's.
    assert login(Client(REMOTE_ADDR="198.51.100.7"), url, "alice", PASSWORD).status_code == 429

    # A try during the cool-down does not extend it
    # (AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT): the right password
    # is accepted once it has passed.
    wait_for(lambda: logged_in(login(client, url, "alice", PASSWORD)), timeout=COOLOFF.total_seconds() + 10,
             interval=0.25, what="the cool-down to end")
    assert client.session["_auth_user_id"] == str(alice.pk)


def test_the_lockout_page_speaks_the_users_language(lockout):
    user_create("li", PASSWORD)
    client = Client(HTTP_ACCEPT_LANGUAGE="zh-hans")
    for _ in range(lockout.AXES_FAILURE_LIMIT):
        locked = login(client, "/accounts/login/", "li", "wrong")
    assert locked.status_code == 429
    page = locked.content.decode()
    assert "尝试次数过多" in page and "即使密码正确也会被拒绝" in page and "Too many attempts" not in page


def test_wrong_passwords_from_one_address_lock_it_for_every_account(lockout):
    user_create("bob", "pw-bob-123")
    guesser = Client(REMOTE_ADDR="203.0.113.5")
    for n in range(lockout.AXES_FAILURE_LIMIT):
        login(guesser, "/accounts/login/", f"nobody{n}", "wrong")
    # A real account's right password, from the guessing address: refused.
    assert login(guesser, "/accounts/login/", "bob", "pw-bob-123").status_code == 429
    # The same account from another address logs in.
    assert logged_in(login(Client(REMOTE_ADDR="203.0.113.6"), "/accounts/login/", "bob", "pw-bob-123"))


def test_staff_unlock_an_account_in_the_admin(lockout, settings):
    settings.AXES_COOLOFF_TIME = timedelta(hours=1)
    user_create("alice", PASSWORD)
    client = Client()
    for _ in range(lockout.AXES_FAILURE_LIMIT):
        login(client, "/accounts/login/", "alice", "wrong")
    assert login(client, "/accounts/login/", "alice", PASSWORD).status_code == 429

    staff = Client()
    staff.force_login(superuser_create("root", "pw-root-123"))
    listing = staff.get("/admin/axes/accessattempt/")
    assert listing.status_code == 200 and b"alice" in listing.content
    attempts = list(AccessAttempt.objects.filter(username="alice").values_list("pk", flat=True))
    staff.post("/admin/axes/accessattempt/", {"action": "delete_selected", "_selected_action": attempts,
                                               "post": "yes"})
    assert not AccessAttempt.objects.filter(username="alice").exists()
    assert logged_in(login(client, "/accounts/login/", "alice", PASSWORD))


def test_axes_reset_username_unlocks_from_the_command_line(lockout, settings):
    settings.AXES_COOLOFF_TIME = timedelta(hours=1)
    user_create("alice", PASSWORD)
    client = Client(REMOTE_ADDR="192.0.2.10")
    for _ in range(lockout.AXES_FAILURE_LIMIT):
        login(client, "/accounts/login/", "alice", "wrong")
    call_command("axes_reset_username", "alice")
    # The address locked too (it made every failure): reset it as well.
    call_command("axes_reset_ip", "192.0.2.10")
    assert logged_in(login(client, "/accounts/login/", "alice", PASSWORD))


# --- API keys -------------------------------------------------------------------------

def v1(raw: str, *, address: str = "127.0.0.1"):
    return Client(REMOTE_ADDR=address).get("/v1/batches", HTTP_AUTHORIZATION=f"Bearer {raw}")


def refused_as(response, code: str) -> dict:
    error = response.json()["error"]
    assert error["code"] == code, error
    return error


def test_a_revoked_key_and_an_expired_key_are_refused_with_openais_401(user):
    revoked, raw_revoked = api_key_create(user=user, name="old laptop")
    expired, raw_expired = api_key_create(user=user, name="trial", expires_at=timezone.now() + timedelta(days=1))
    assert v1(raw_revoked).status_code == 200 and v1(raw_expired).status_code == 200

    ApiKey.objects.filter(pk=revoked.pk).update(revoked_at=timezone.now())
    ApiKey.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    for raw, word in ((raw_revoked, "revoked"), (raw_expired, "expired")):
        answer = v1(raw)
        assert answer.status_code == 401
        error = refused_as(answer, "invalid_api_key")
        assert error["type"] == "invalid_request_error" and word in error["message"]
        assert raw not in error["message"]  # the prefix names the key, never the secret
    assert {k.state for k in ApiKey.objects.all()} == {"revoked", "expired"}


def test_create_api_key_and_revoke_api_key_commands(user, capsys):
    call_command("create_api_key", user.username, "--name", "ci", "--expires-in-days", "30")
    raw = capsys.readouterr().out.strip()
    key = ApiKey.objects.get(name="ci")
    assert timedelta(days=29) < key.expires_at - timezone.now() <= timedelta(days=30)
    assert v1(raw).status_code == 200
    call_command("revoke_api_key", key.prefix)
    assert "Revoked" in capsys.readouterr().out
    assert v1(raw).status_code == 401
    entry = AuditEntry.objects.get(action="api_key.revoke")
    assert entry.target.startswith(key.prefix) and entry.detail == {"by": "manage.py revoke_api_key"}


def test_last_used_is_written_at_most_once_a_minute(user):
    key, raw = api_key_create(user=user)
    assert v1(raw).status_code == 200
    first = ApiKey.objects.get(pk=key.pk).last_used_at
    assert first is not None
    assert v1(raw).status_code == 200
    assert ApiKey.objects.get(pk=key.pk).last_used_at == first


def test_wrong_keys_lock_out_the_address_then_the_cool_down_lets_it_back(user, settings):
    settings.API_KEY_FAILURE_LIMIT = 3
    settings.API_KEY_COOLOFF_SECONDS = 2
    _key, raw = api_key_create(user=user)
    address = f"203.0.113.{uuid.uuid4().int % 200 + 20}"
    for _ in range(settings.API_KEY_FAILURE_LIMIT):
        assert v1(f"sk-chat-{uuid.uuid4().hex}", address=address).status_code == 401
    # The right key from that address is refused too, in OpenAI's shape.
    throttled = v1(raw, address=address)
    assert throttled.status_code == 429
    assert refused_as(throttled, "rate_limited")["type"] == "rate_limit_exceeded"
    assert v1(raw, address="192.0.2.77").status_code == 200  # other addresses are not held up
    wait_for(lambda: v1(raw, address=address).status_code == 200, timeout=12, interval=0.25,
             what="the key cool-down to end")


def test_wrong_keys_with_one_prefix_lock_out_that_prefix_from_any_address(user, settings):
    settings.API_KEY_FAILURE_LIMIT = 3
    key, raw = api_key_create(user=user)
    for n in range(settings.API_KEY_FAILURE_LIMIT):
        # A guesser aiming at this key: its shown prefix, from many addresses.
        assert v1(key.prefix + uuid.uuid4().hex, address=f"198.51.100.{n + 1}").status_code == 401
    assert v1(raw, address="198.51.100.99").status_code == 429
    # Another key (another prefix: 4 random characters) from there is served.
    assert v1(api_key_create(user=user)[1], address="198.51.100.99").status_code == 200


def test_a_revoked_key_is_not_counted_as_a_guess(user, settings):
    settings.API_KEY_FAILURE_LIMIT = 2
    revoked, raw_revoked = api_key_create(user=user)
    ApiKey.objects.filter(pk=revoked.pk).update(revoked_at=timezone.now())
    _key, raw = api_key_create(user=user)
    address = "192.0.2.200"
    for _ in range(5):
        assert v1(raw_revoked, address=address).status_code == 401
    assert v1(raw, address=address).status_code == 200


def test_api_keys_show_name_state_expiry_and_last_use_in_the_admin(user, admin_client):
    _key, raw = api_key_create(user=user, name="build server", expires_at=timezone.now() + timedelta(days=7))
    v1(raw)
    page = admin_client.get("/admin/chat/apikey/").content.decode()
    for column in ("build server", "live", "Expires at", "Last used at"):
        assert column in page, column


# --- the page's headers ------------------------------------------------------------------

def csp_directives(response) -> dict[str, list[str]]:
    policy = response["Content-Security-Policy"]
    return {part.split()[0]: part.split()[1:] for part in policy.split(";") if part.strip()}


@pytest.mark.parametrize("path", ["/", "/accounts/login/", "/admin/", "/admin/login/"])
def test_every_page_has_the_content_security_policy_and_the_security_headers(path):
    client = Client()
    if "login" not in path:
        client.force_login(superuser_create("root", "pw-root-123"))
    response = client.get(path)
    assert response.status_code == 200
    csp = csp_directives(response)
    assert csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"]
    assert csp["connect-src"] == ["'self'"]  # the websocket: ws(s) on the page's own host
    assert csp["frame-ancestors"] == ["'none'"] and csp["object-src"] == ["'none'"]
    assert "unsafe-inline" not in response["Content-Security-Policy"]
    assert "unsafe-eval" not in response["Content-Security-Policy"]
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"
    assert response["X-Frame-Options"] == "DENY"


#: What a policy without 'unsafe-inline' refuses in a template: a <script>
#: with a body (a JSON data block runs nothing and is allowed), a style
#: attribute or element, an inline event handler, a javascript: URL.
INLINE = re.compile(r"""<script(?![^>]*\bsrc=)(?![^>]*type="application/json")[^>]*>\s*\S"""
                    r"""|\sstyle="|<style\b|\son[a-z]+="|javascript:""", re.IGNORECASE)


def test_no_template_of_ours_has_inline_script_or_style():
    templates = sorted((ROOT / "chat" / "templates").rglob("*.html"))
    assert templates
    offenders = [f"{path.relative_to(ROOT)}: {match.group(0)!r}" for path in templates
                 for match in INLINE.finditer(path.read_text())]
    assert offenders == []


# --- the audit log -----------------------------------------------------------------------

@pytest.fixture
def sent_tasks(monkeypatch):
    """GPU tasks sent by the admin page, recorded instead of queued."""
    sent = []
    monkeypatch.setattr("chat.admin_gpu.app.signature", lambda name, **options: SimpleNamespace(
        apply_async=lambda: sent.append((name, options))))
    return sent


def test_gpu_actions_are_audited_with_who_and_when(admin_client, demo_model, sent_tasks):
    before = timezone.now()
    admin_client.post("/admin/gpu/", {"action": "unload"})
    admin_client.post("/admin/gpu/", {"action": "load", "model": "local_demo"})
    admin_client.post("/admin/gpu/", {"action": "load", "model": "nope"})  # refused: nothing done, nothing audited
    assert len(sent_tasks) == 2
    entries = list(AuditEntry.objects.order_by("id"))
    assert [(e.username, e.action, e.target) for e in entries] == [
        ("admin", "gpu.unload", "every local model"), ("admin", "gpu.load", "local_demo")]
    assert all(before <= e.at <= timezone.now() for e in entries)
    page = admin_client.get("/admin/chat/auditentry/").content.decode()
    assert "gpu.load" in page and "local_demo" in page
    # The record is kept: staff read it, nobody edits or deletes it.
    assert admin_client.get(f"/admin/chat/auditentry/{entries[0].pk}/delete/").status_code == 403


def test_model_config_changes_are_audited_without_the_secret(admin_client):
    response = admin_client.post("/admin/chat/modelconfig/add/", model_form(api_key="sk-audit-secret-1234"))
    assert response.status_code == 302, response.content[-2000:]
    config = ModelConfig.objects.get(name="remote-gpt")
    admin_client.post(f"/admin/chat/modelconfig/{config.pk}/change/", model_form(temperature="0.2"))
    admin_client.post(f"/admin/chat/modelconfig/{config.pk}/delete/", {"post": "yes"})
    added, changed, deleted = AuditEntry.objects.order_by("id")
    assert [(e.username, e.action, e.target) for e in (added, changed, deleted)] == [
        ("admin", "model_config.add", "remote-gpt"), ("admin", "model_config.change", "remote-gpt"),
        ("admin", "model_config.delete", "remote-gpt")]
    assert added.detail["api_key"] == "changed"
    assert changed.detail == {"temperature": [0.7, 0.2]}
    assert "sk-audit-secret-1234" not in str(added.detail)


# --- /readyz's logs ------------------------------------------------------------------------

@pytest.fixture
def nobody_alive(monkeypatch):
    monkeypatch.setattr("chat.dispatch.WORKER_ALIVE_PREFIX", "worker:alive-nobody")
    monkeypatch.setattr(views, "_readiness", views.ReadinessLog())


def test_readyz_logs_a_change_once_and_no_error_per_probe(client, nobody_alive, caplog):
    caplog.set_level(logging.INFO)
    for _ in range(5):
        assert client.get("/readyz").status_code == 503
    assert [r.levelno for r in caplog.records if r.name == "django.request"] == []
    warnings = [r for r in caplog.records if r.name == "chat.views"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "gpu worker" in warnings[0].getMessage()
