"""API keys: created for a user (`manage.py create_api_key`, the admin),
stored as a SHA-256 digest, looked up by that digest on every request;
named, revocable, with an optional expiry and a "last used" time (issue 17).
Unknown keys are throttled per address and per key prefix
(chat/api/key_throttle.py)."""
from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from chat.api.key_throttle import key_guess_record, key_guesses_check
from chat.models import ApiKey
from chatsite.errors import CodedError

#: Keys look like OpenAI's (`sk-…`), so tools that check the shape accept them.
KEY_PREFIX = "sk-chat-"
#: Characters of the key kept in clear, to tell keys apart in the admin.
SHOWN_CHARS = 12
#: OpenAI's words for a key it does not know.
BAD_KEY = "Incorrect API key provided."


class KeyRefused(CodedError):
    """A key that is unknown, revoked or expired, or whose user is inactive
    (OpenAI's `invalid_api_key`, 401)."""

    code = "invalid_api_key"


def api_key_digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def api_key_secret_set(key: ApiKey) -> str:
    """Give an unsaved key its secret; the raw key is returned once and
    never stored."""
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    key.prefix, key.digest = raw[:SHOWN_CHARS], api_key_digest(raw)
    return raw


def api_key_create(*, user, name: str = "", expires_at: datetime | None = None) -> tuple[ApiKey, str]:
    key = ApiKey(user=user, name=name, expires_at=expires_at)
    raw = api_key_secret_set(key)
    key.save()
    return key, raw


def api_key_authenticate(*, raw: str, address: str):
    """The active user whose live key `raw` is. Raises KeyThrottled while
    the address or the key's prefix is locked out, KeyRefused otherwise."""
    prefix = raw[:SHOWN_CHARS]
    key_guesses_check(address=address, prefix=prefix)
    key = ApiKey.objects.select_related("user").filter(digest=api_key_digest(raw)).first()
    if key is None:
        key_guess_record(address=address, prefix=prefix)
        raise KeyRefused(BAD_KEY)
    # A known key is not a guess: refused, not counted.
    if key.revoked_at is not None:
        raise KeyRefused(f"This API key ({key.prefix}…) was revoked on {key.revoked_at:%Y-%m-%d %H:%M} UTC.")
    now = timezone.now()
    if key.expires_at is not None and key.expires_at <= now:
        raise KeyRefused(f"This API key ({key.prefix}…) expired on {key.expires_at:%Y-%m-%d %H:%M} UTC.")
    if not key.user.is_active:
        raise KeyRefused(BAD_KEY)
    # One write per key and interval, not one per request.
    if key.last_used_at is None or now - key.last_used_at > timedelta(seconds=settings.API_KEY_TOUCH_SECONDS):
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
    return key.user


def api_keys_revoke(*, keys) -> int:
    return keys.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
