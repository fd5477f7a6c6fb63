"""What a batch's input line may hold (chat/batches.py validates a file
with `line_check`, one line at a time): the request's envelope (custom_id,
method, url), then its body, checked as the endpoint's own view checks a
request. A line that fails becomes an error line with `LineInvalid`'s code."""
from __future__ import annotations

from django.conf import settings

from chat.catalog import CatalogError, model_resolve
from chat.completions import RequestError, chat_request_parse
from chat.embeddings import embedding_backend, embedding_request_parse
from chat.jsonbody import BadJson, json_value
from chat.models import Batch, BatchLine
from chatsite.errors import CodedError

CHAT, EMBEDDINGS = "/v1/chat/completions", "/v1/embeddings"
ENDPOINTS = (CHAT, EMBEDDINGS)


class LineInvalid(CodedError):
    """A line that cannot run: it ends as an error line with this code;
    `param`, when one parameter of its body is at fault."""

    def __init__(self, code: str, detail: str, *, param: str | None = None):
        super().__init__(code, detail)
        self.param = param


def line_check(batch: Batch, line: BatchLine, raw: str, seen: set, choices: dict) -> None:
    number = line.line
    try:
        request = json_value(raw, what=f"Line {number}")
    except BadJson as exc:
        raise LineInvalid("invalid_json", exc.detail) from exc
    if not isinstance(request, dict):
        raise LineInvalid("invalid_request", f"Line {number}: a request must be a JSON object.")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineInvalid("missing_custom_id", f"Line {number}: custom_id must be a non-empty string.")
    line.custom_id = custom_id[:512]
    if custom_id in seen:
        raise LineInvalid("duplicate_custom_id", f"Line {number}: the custom_id {custom_id!r} is used by an earlier line.")
    seen.add(custom_id)
    if request.get("method") != "POST":
        raise LineInvalid("invalid_method", f"Line {number}: method must be \"POST\".")
    if request.get("url") != batch.endpoint:
        raise LineInvalid("invalid_url", f"Line {number}: url must be {batch.endpoint!r} (the batch's endpoint), "
                       f"not {request.get('url')!r}.")
    if batch.endpoint == EMBEDDINGS:
        embedding_line_check(line, request.get("body"), choices)
        return
    body = request.get("body")
    n = body.get("n") if isinstance(body, dict) else None
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        raise LineInvalid("invalid_request", f"Line {number}: n must be 1 in a batch: each line gets one response.",
                       param="n")
    try:
        parsed = chat_request_parse(body)
    except RequestError as exc:
        raise LineInvalid("invalid_request", f"Line {number}: {exc.detail}") from exc
    if len(parsed.content) > settings.CHAT_MAX_CONTENT_CHARS:
        raise LineInvalid("content_too_long", f"Line {number}: the last message is longer than "
                       f"{settings.CHAT_MAX_CONTENT_CHARS} characters.")
    if parsed.model not in choices:
        try:
            choices[parsed.model] = model_resolve(parsed.model)
        except CatalogError as exc:
            choices[parsed.model] = exc
    choice = choices[parsed.model]
    if isinstance(choice, CatalogError):
        code = "model_not_found" if choice.code in ("unknown_model", "model_disabled") else choice.code
        raise LineInvalid(code, f"Line {number}: {choice}")
    line.body, line.model_name, line.owner = request["body"], choice.name, choice.needs_gpu_owner or ""


def embedding_line_check(line: BatchLine, body, checked: dict) -> None:
    """An embeddings line's body, checked as `/v1/embeddings` checks one. A
    model's answer is kept per (model, what the backend must take), so a
    50,000-line file asks once a model."""
    try:
        parsed = embedding_request_parse(body)
        key = (parsed.model, parsed.tokens, parsed.input_type is not None)
        if key not in checked:
            try:
                embedding_backend(request=parsed)
                checked[key] = None
            except RequestError as exc:
                checked[key] = exc
        if checked[key] is not None:
            raise checked[key]
    except RequestError as exc:
        raise LineInvalid(exc.code, f"Line {line.line}: {exc.detail}", param=exc.param) from exc
    line.body, line.model_name, line.owner = body, parsed.model, ""  # takes no GPU owner's turn
