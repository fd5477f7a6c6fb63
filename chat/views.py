"""HTTP views: the chat page, the GPU status and model APIs, health checks."""
from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from chat import selectors
from chatsite.redis_client import redis_client
from workers.heartbeat import workers_alive


def api_login_required(view):
    """An API answers 401 JSON to an anonymous caller instead of a redirect
    to the login page, which a script (or the page's fetch) cannot use."""
    def wrapped(request: HttpRequest, *args, **kwargs):
        if not request.user.is_authenticated:
            return JsonResponse({"error": "authentication required"}, status=401)
        return view(request, *args, **kwargs)
    wrapped.__name__ = view.__name__
    return wrapped


@login_required
def index(request: HttpRequest) -> HttpResponse:
    page_config = {"ws_url": "/ws/chat/", "models_url": "/api/models/", "gpu_url": "/api/gpu/"}
    return render(request, "chat/index.html", {"page_config": page_config})


@require_GET
@api_login_required
def api_gpu(request: HttpRequest) -> JsonResponse:
    return JsonResponse(selectors.gpu_status())


@require_GET
@api_login_required
def api_models(request: HttpRequest) -> JsonResponse:
    return JsonResponse(selectors.models_available())


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """200 only when the database, Redis and a GPU and a CPU worker answer
    (CONTRACT §7); otherwise 503 naming what is missing."""
    missing = []
    try:
        connection.ensure_connection()
    except Exception as exc:  # any driver error means "not ready"
        missing.append(f"database: {exc}")
    try:
        redis_client().ping()
    except Exception as exc:
        missing.append(f"redis: {exc}")
    else:
        alive = workers_alive()
        for queue in ("gpu", "cpu"):
            if not alive.get(queue):
                missing.append(f"{queue} worker: none answered")
    status = 503 if missing else 200
    return JsonResponse({"status": "ready" if not missing else "not ready", "missing": missing}, status=status)
