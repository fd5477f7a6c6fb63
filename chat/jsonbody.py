"""The one place JSON from a client is parsed: a websocket frame, an HTTP
body, a line of a batch file.

It raises `BadJson` (code `bad_json`) with a detail that names what was
sent; each surface puts that detail into its own envelope under its own
code (the socket's `bad_frame`, the /v1 API's `invalid_request`, a batch
line's `invalid_json`; the session API keeps `bad_json`).
"""
from __future__ import annotations

import json

from chatsite.errors import CodedError


class BadJson(CodedError):
    """What a client sent is not JSON, or not the JSON asked for."""

    code = "bad_json"


def json_value(raw: bytes | str, *, what: str = "The body"):
    """`raw` parsed; `what` ("The body", "Line 3") starts the detail of the
    BadJson raised otherwise."""
    try:
        return json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError, for bytes, is one too
        raise BadJson(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError:
        # json.loads recurses once per level: 2 KB of "[[[[…" is enough.
        raise BadJson(f"{what} is JSON nested too deeply.") from None


def json_object(raw: bytes | str, *, what: str = "The body") -> dict:
    """`raw` parsed, which must be one JSON object; BadJson otherwise."""
    value = json_value(raw, what=what)
    if not isinstance(value, dict):
        raise BadJson(f"{what} must be a JSON object.")
    return value
