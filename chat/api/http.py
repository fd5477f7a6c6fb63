"""What every /v1/ view shares: Bearer authentication, the allowed methods,
JSON bodies, and errors turned into OpenAI's envelope and status."""
from __future__ import annotations

import functools

from asgiref.sync import sync_to_async
from axes.helpers import get_client_ip_address
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, JsonResponse
from django.utils.decorators import iscoroutinefunction, markcoroutinefunction
from django.views.decorators.csrf import csrf_exempt

from chat.api.keys import api_key_authenticate
from chat.completions import RequestError, error_body
from chat.jsonbody import BadJson, json_object
from chatsite.errors import CodedError

NO_KEY = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
          "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). Create one with "
          "`python manage.py create_api_key USERNAME`.")


def error_response(exc: CodedError) -> JsonResponse:
    """OpenAI's error body and status for a RequestError, or for any other
    coded error under its own code."""
    if not isinstance(exc, RequestError):
        exc = RequestError(exc.code, exc.detail)
    return JsonResponse(exc.body(), status=exc.status)


def json_body(request: HttpRequest) -> dict:
    """The request's JSON object; `invalid_request` otherwise, and 413 for
    a body past DATA_UPLOAD_MAX_MEMORY_SIZE (Django's own answer to that is
    a 400 HTML page)."""
    try:
        return json_object(request.body or b"null")
    except RequestDataTooBig as exc:
        raise RequestError("invalid_request", f"The request body is larger than "
                           f"{settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes.", status=413) from exc
    except BadJson as exc:
        raise RequestError("invalid_request", exc.detail) from exc


def _bearer(request: HttpRequest) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _authenticate(request: HttpRequest):
    """The user of the request's live API key; otherwise a RequestError:
    `invalid_api_key` (401), or `rate_limited` (429) while the address or
    the key's prefix is cooling down after wrong keys (chat/api/keys.py).
    The address is the one django-axes counts logins by."""
    token = _bearer(request)
    if token is None:
        raise RequestError("invalid_api_key", NO_KEY, status=401)
    try:
        return api_key_authenticate(raw=token, address=get_client_ip_address(request) or "")
    except CodedError as exc:
        raise RequestError(exc.code, exc.detail) from exc


def _refused(exc: CodedError, methods: tuple[str, ...]) -> JsonResponse:
    response = error_response(exc)
    if response.status_code == 405:
        response["Allow"] = ", ".join(methods)  # RFC 9110 15.5.6: a 405 names the methods allowed
    return response


def api_view(*methods: str):
    """An API view: answers only `methods`, sets `request.user` from the API
    key (401 without a live one), and answers a coded error raised inside
    (a RequestError, mostly) with OpenAI's error body. Works for sync and
    async views; CSRF does not apply to a Bearer-authenticated API."""

    def check_method(request: HttpRequest) -> None:
        if request.method not in methods:
            raise RequestError("invalid_request", f"{request.method} is not allowed here; use {', '.join(methods)}.",
                               status=405)

    def decorate(view):
        if iscoroutinefunction(view):
            async def wrapped(request: HttpRequest, *args, **kwargs):
                try:
                    check_method(request)
                    request.user = await sync_to_async(_authenticate)(request)
                    return await view(request, *args, **kwargs)
                except CodedError as exc:
                    return _refused(exc, methods)
        else:
            def wrapped(request: HttpRequest, *args, **kwargs):
                try:
                    check_method(request)
                    request.user = _authenticate(request)
                    return view(request, *args, **kwargs)
                except CodedError as exc:
                    return _refused(exc, methods)
        wrapped = functools.wraps(view)(wrapped)
        if iscoroutinefunction(view):
            markcoroutinefunction(wrapped)
        wrapped.csrf_exempt = True
        return wrapped

    return decorate


@csrf_exempt  # a POST with a Bearer key to a wrong path gets this 404, not the CSRF check's 403 page
def not_found(request: HttpRequest, *args, **kwargs) -> JsonResponse:
    """Any other /v1/ path, in OpenAI's shape rather than Django's HTML page."""
    return JsonResponse(error_body("not_found", f"Invalid URL ({request.method} {request.path})"),
                        status=404)
