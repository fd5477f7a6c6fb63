"""Admin pages for the OpenAI-compatible API: API keys (created here or with
`manage.py create_api_key`, shown once, with an expiry, revocable), batches with their
progress, and their files to download. Registered from ChatConfig.ready()."""
from django.contrib import admin, messages
from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from django.urls import path, reverse
from django.utils.html import format_html

from chat import batches
from chat.api.keys import api_key_secret_set, api_keys_revoke
from chat.audit import audit_record, form_changes
from chat.completions import RequestError
from chat.models import ApiKey, Batch, BatchFile


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys with their name, state, expiry and last use (issue 17). Revoking
    (the list's action) is recorded in the audit log."""

    list_display = ("prefix", "name", "user", "state", "created_at", "expires_at", "last_used_at", "revoked_at")
    list_select_related = ("user",)
    list_filter = ("revoked_at", "expires_at")
    search_fields = ("name", "prefix", "user__username")
    actions = ["revoke"]

    def get_fields(self, request, obj=None):
        return ("user", "name", "expires_at") if obj is None else (
            "user", "name", "prefix", "state", "created_at", "expires_at", "last_used_at", "revoked_at")

    def get_readonly_fields(self, request, obj=None):
        return () if obj is None else ("user", "prefix", "state", "created_at", "last_used_at", "revoked_at")

    def save_model(self, request, obj, form, change) -> None:
        raw = None if change else api_key_secret_set(obj)
        super().save_model(request, obj, form, change)
        audit_record(user=request.user, action="api_key.change" if change else "api_key.add",
                     target=f"{obj.prefix}… of {obj.user}", detail=form_changes(form))
        if raw:
            messages.warning(request, f"The new API key is {raw} — copy it now: it is stored hashed and "
                                      f"cannot be shown again.")

    @admin.display(description="state")
    def state(self, obj: ApiKey) -> str:
        return obj.state

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request, queryset) -> None:
        live = list(queryset.filter(revoked_at__isnull=True).select_related("user"))
        count = api_keys_revoke(keys=queryset)
        for key in live:
            audit_record(user=request.user, action="api_key.revoke", target=f"{key.prefix}… of {key.user}")
        self.message_user(request, f"{count} key(s) revoked.")


@admin.register(BatchFile)
class BatchFileAdmin(admin.ModelAdmin):
    list_display = ("id", "user", "purpose", "filename", "bytes", "created_at", "download")
    list_select_related = ("user",)
    list_filter = ("purpose",)
    search_fields = ("id", "filename", "user__username")
    # The content can be 200 MB: never in a form or a list, only as a download.
    fields = ("id", "user", "purpose", "filename", "bytes", "created_at", "download")
    readonly_fields = fields

    def get_queryset(self, request):
        return super().get_queryset(request).defer("content")

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def get_urls(self):
        return [path("<str:file_id>/download/", self.admin_site.admin_view(self.download_view),
                     name="chat_batchfile_download")] + super().get_urls()

    def download_view(self, request, file_id: str) -> HttpResponse:
        if not self.has_view_permission(request):
            return HttpResponse(status=403)
        file = get_object_or_404(BatchFile, pk=file_id)
        response = HttpResponse(file.content.encode(), content_type="application/jsonl")
        response["Content-Disposition"] = f'attachment; filename="{file.filename}"'
        return response

    @admin.display(description="download")
    def download(self, obj: BatchFile) -> str:
        return _file_link(obj.pk)


def _file_link(file_id: str | None) -> str:
    if not file_id:
        return "-"
    return format_html('<a href="{}">{}</a>', reverse("admin:chat_batchfile_download", args=[file_id]), file_id)


@admin.register(Batch)
class BatchAdmin(admin.ModelAdmin):
    list_display = ("id", "user", "status", "progress", "order", "created_at", "completed_at")
    list_select_related = ("user",)
    list_filter = ("status", "order")
    search_fields = ("id", "user__username")
    actions = ["cancel"]
    fields = ("id", "user", "status", "progress", "endpoint", "order", "input", "output", "errors_file",
              "errors", "metadata", "created_at", "in_progress_at", "completed_at", "failed_at",
              "cancelling_at", "cancelled_at", "expires_at")
    readonly_fields = fields

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="progress")
    def progress(self, obj: Batch) -> str:
        counts = batches.batch_counts(obj)
        ended = counts["completed"] + counts["failed"]
        return format_html('<progress max="{}" value="{}"></progress> {} done, {} failed of {}',
                           counts["total"] or 1, ended, counts["completed"], counts["failed"], counts["total"])

    @admin.display(description="input file")
    def input(self, obj: Batch) -> str:
        return _file_link(obj.input_file_id)

    @admin.display(description="output file")
    def output(self, obj: Batch) -> str:
        return _file_link(obj.output_file_id)

    @admin.display(description="error file")
    def errors_file(self, obj: Batch) -> str:
        return _file_link(obj.error_file_id)

    @admin.action(description="Cancel the selected batches")
    def cancel(self, request, queryset) -> None:
        for batch in queryset:
            try:
                batches.batch_cancel(batch=batch)
            except RequestError as exc:
                self.message_user(request, f"{batch.pk}: {exc.detail}", level=messages.WARNING)
