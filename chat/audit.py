"""The audit log (issue 17): who did what to the running service, and when.

Written where staff act (the admin's GPU page, model configuration, API
keys), read in the admin (Chat › Audit log). Each entry is also a log line,
so a log shipper sees the same record."""
from __future__ import annotations

import logging

from chat.models import AuditEntry

log = logging.getLogger(__name__)

#: Form fields whose values never go into the log: only that they changed.
SECRET_FIELDS = frozenset({"api_key"})


def audit_record(*, user, action: str, target: str = "", detail: dict | None = None) -> AuditEntry:
    """Record `action` on `target` by `user` (a staff member; None for a
    management command, named in `detail`)."""
    entry = AuditEntry.objects.create(user=user, username=user.get_username() if user else "", action=action,
                                      target=target[:200], detail=detail or {})
    log.info("audit: %s %s %s %s", entry.username or "-", action, target, detail or "")
    return entry


def form_changes(form) -> dict:
    """What a saved admin form changed, field by field as [before, after]
    in plain values (the entry outlives the model's fields); a secret only
    as "changed". Compared after cleaning, not as Django's `changed_data`
    does: a write-only key left empty keeps the stored one, and a field the
    form leaves out keeps its value; neither is a change."""
    changes = {}
    for name in form.changed_data:
        if name not in {field.name for field in form.instance._meta.concrete_fields}:
            continue  # a form-only field (e.g. "remove the key"): seen in its model field
        before, after = _plain(form.initial.get(name)), _plain(form.cleaned_data.get(name))
        if before == after or (before in (None, "") and after in (None, "")):
            continue
        changes[name] = "changed" if name in SECRET_FIELDS else [before, after]
    return changes


def _plain(value):
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
