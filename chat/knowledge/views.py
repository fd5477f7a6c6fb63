"""/api/knowledge/ (CONTRACT §8): a user's knowledge bases over HTTP,
session-authenticated like the page (CSRF token as X-CSRFToken)."""
from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_http_methods, require_POST

from chat.knowledge import bases
from chat.knowledge.bases import KnowledgeInputError
from chat.views import api_login_required


def _error(exc: KnowledgeInputError) -> JsonResponse:
    return JsonResponse({"error": {"code": exc.code, "detail": exc.detail}}, status=exc.status)


@require_http_methods(["GET", "POST"])
@api_login_required
def api_knowledge(request: HttpRequest) -> JsonResponse:
    """GET: the user's bases; POST (multipart name + files): a new base."""
    if request.method == "GET":
        found = bases.KnowledgeBase.objects.filter(user=request.user).order_by("-created_at")
        return JsonResponse({"knowledge": [bases.base_public(b) for b in found]})
    try:
        base = bases.base_create(user=request.user, name=request.POST.get("name", ""),
                                 files=request.FILES.getlist("files"))
    except KnowledgeInputError as exc:
        return _error(exc)
    return JsonResponse(bases.base_public(base), status=201)


@require_http_methods(["GET", "DELETE"])
@api_login_required
def api_knowledge_one(request: HttpRequest, base_id: int) -> HttpResponse:
    try:
        base = bases.base_get(user=request.user, base_id=base_id)
    except KnowledgeInputError as exc:
        return _error(exc)
    if request.method == "DELETE":
        bases.base_delete(base=base)
        return HttpResponse(status=204)
    return JsonResponse(bases.base_public(base))


@require_POST
@api_login_required
def api_knowledge_files(request: HttpRequest, base_id: int) -> JsonResponse:
    try:
        base = bases.base_get(user=request.user, base_id=base_id)
        base = bases.base_files_add(base=base, files=request.FILES.getlist("files"))
    except KnowledgeInputError as exc:
        return _error(exc)
    return JsonResponse(bases.base_public(base), status=201)
