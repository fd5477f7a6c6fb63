"""API keys: created for a user (`manage.py create_api_key`, the admin),
stored as a SHA-256 digest, looked up by that digest on every request."""
from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from chat.models import ApiKey

#: Keys look like OpenAI's (`sk-…`), so tools that check the shape accept them.
KEY_PREFIX = "sk-chat-"
#: Characters of the key kept in clear, to tell keys apart in the admin.
SHOWN_CHARS = 12


def api_key_digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def api_key_secret_set(key: ApiKey) -> str:
    """Give an unsaved key its secret; the raw key is returned once and
    never stored."""
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    key.prefix, key.digest = raw[:SHOWN_CHARS], api_key_digest(raw)
    return raw


def api_key_create(*, user, name: str = "") -> tuple[ApiKey, str]:
    key = ApiKey(user=user, name=name)
    raw = api_key_secret_set(key)
    key.save()
    return key, raw


def api_key_user(raw: str):
    """The active user whose live key this is, or None."""
    key = (ApiKey.objects.select_related("user")
           .filter(digest=api_key_digest(raw), revoked_at__isnull=True, user__is_active=True).first())
    if key is None:
        return None
    now = timezone.now()
    # One write per key and interval, not one per request.
    if key.last_used_at is None or now - key.last_used_at > timedelta(seconds=settings.API_KEY_TOUCH_SECONDS):
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
    return key.user


def api_keys_revoke(*, keys) -> int:
    return keys.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
