"""The admin's GPU page: who owns each GPU slot, what is resident, memory
and recent transitions; "unload now" and "load now" are queued on the `gpu`
queue like every message, so they never race one."""
from __future__ import annotations

from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.views.decorators.http import require_http_methods

from chat.audit import audit_record
from chat.models import LOCAL_KINDS, ModelConfig
from chat.selectors import gpu_status
from chatsite import queues
from chatsite.celery import app


@require_http_methods(["GET", "POST"])
def gpu_page(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        action = request.POST.get("action")
        if action == "unload":
            app.signature(queues.GPU_UNLOAD).apply_async()
            audit_record(user=request.user, action="gpu.unload", target="every local model")
            messages.info(request, "Unloading every local model: queued behind the messages already waiting.")
        elif action == "load":
            name = request.POST.get("model", "")
            if not ModelConfig.objects.filter(kind__in=LOCAL_KINDS, enabled=True, name=name).exists():
                messages.error(request, f"No enabled local model is named {name!r}.")
            else:
                app.signature(queues.GPU_LOAD, args=(name,)).apply_async()
                audit_record(user=request.user, action="gpu.load", target=name)
                messages.info(request, f"Loading {name}: queued behind the messages already waiting.")
        else:
            messages.error(request, "Unknown action.")
        return redirect("admin-gpu")
    status = gpu_status(events_limit=30)
    context = {
        **admin.site.each_context(request),
        "title": "GPU",
        "slots": status["slots"],
        "events": list(reversed(status["events"])),
        "local_models": ModelConfig.objects.filter(kind__in=LOCAL_KINDS, enabled=True).values_list("name", flat=True),
    }
    return TemplateResponse(request, "admin/gpu.html", context)
