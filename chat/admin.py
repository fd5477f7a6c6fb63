from django import forms
from django.contrib import admin, messages
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext_lazy as _

from chat import selectors
from chat.audit import audit_record, form_changes
from chat.catalog import catalog_forget
from chat.models import (AuditEntry, Conversation, KnowledgeBase, KnowledgeDocument, Message, ModelConfig,
                         Translation)


class ModelConfigForm(forms.ModelForm):
    # The key is write-only: the field renders empty, and leaving it empty on
    # save keeps the stored key (so editing a temperature does not wipe it).
    api_key = forms.CharField(
        required=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Leave empty to keep the stored key. Never shown back.",
    )
    # Ollama and most self-hosted endpoints speak plain http on a LAN.
    base_url = forms.URLField(required=False, assume_scheme="http")
    clear_api_key = forms.BooleanField(required=False, label="Remove the stored API key")
    # Only embedding models use it: a form for any other kind may leave it out.
    pooling = forms.ChoiceField(required=False, choices=ModelConfig._meta.get_field("pooling").choices,
                                help_text=ModelConfig._meta.get_field("pooling").help_text)

    class Meta:
        model = ModelConfig
        fields = "__all__"

    def clean_pooling(self) -> str:
        return self.cleaned_data.get("pooling") or "mean"

    def clean_api_key(self) -> str:
        new = self.cleaned_data.get("api_key", "")
        if new:
            return new
        return "" if self.data.get("clear_api_key") else (self.instance.api_key or "")


@admin.register(ModelConfig)
class ModelConfigAdmin(admin.ModelAdmin):
    form = ModelConfigForm
    list_display = ("name", "kind", "enabled", "is_default", "target", "has_api_key", "frees_gpu")
    list_filter = ("kind", "enabled")
    search_fields = ("name", "path", "base_url")
    fields = (
        "kind", "name", "enabled", "is_default", "path", "base_url", "api_key", "clear_api_key",
        "frees_gpu", "keep_alive", "preload", "warm_offload", "max_new_tokens", "temperature", "top_p",
        "pooling", "query_prefix", "passage_prefix", "targets", "discovered_models",
    )
    readonly_fields = ("discovered_models",)
    actions = ["test_connection"]

    @admin.action(description=_("Test connection and list the models"))
    def test_connection(self, request, queryset) -> None:
        for config in queryset:
            probe = selectors.model_config_probe(config=config)
            # Quoted: the admin capitalises a message's first letter, and a
            # name is case-sensitive.
            values = {"name": config.name, "detail": probe["detail"], "models": ", ".join(probe["models"]) or "—"}
            if probe["ok"]:
                self.message_user(request, _("“%(name)s” OK — %(detail)s: %(models)s") % values, messages.SUCCESS)
            else:
                self.message_user(request, _("“%(name)s” failed — %(detail)s") % values, messages.ERROR)
        catalog_forget()  # the picker shows what was just found, not a cached answer

    @admin.display(description=_("discovered models"))
    def discovered_models(self, obj: ModelConfig | None) -> str:
        # Asked live on every change page: an admin opening a row wants to
        # know what it offers now. Never shows the key (CONTRACT: write-only).
        if obj is None or obj.pk is None:
            return _("Save first; then this lists what the model or endpoint offers.")
        probe = selectors.model_config_probe(config=obj)
        if not probe["ok"]:
            return format_html('<span class="errornote-inline">{}</span>', probe["detail"])
        items = format_html_join("", "<li>{}</li>", ((name,) for name in probe["models"]))
        return format_html("{}<ul>{}</ul>", probe["detail"], items)

    def changelist_view(self, request, extra_context=None):
        # The GPU page (chat/admin_gpu.py) has its own URL outside the model admins.
        extra_context = {**(extra_context or {}), "gpu_url": reverse("admin-gpu")}
        return super().changelist_view(request, extra_context)

    def save_model(self, request, obj, form, change) -> None:
        super().save_model(request, obj, form, change)
        catalog_forget()  # the picker shows the edit at once, not after the cache TTL
        audit_record(user=request.user, action="model_config.change" if change else "model_config.add",
                     target=obj.name, detail=form_changes(form))

    def delete_model(self, request, obj) -> None:
        name = obj.name
        super().delete_model(request, obj)
        catalog_forget()
        audit_record(user=request.user, action="model_config.delete", target=name)

    def delete_queryset(self, request, queryset) -> None:
        # The list's "delete selected" action: one entry per row, as for one.
        names = list(queryset.values_list("name", flat=True))
        super().delete_queryset(request, queryset)
        catalog_forget()
        for name in names:
            audit_record(user=request.user, action="model_config.delete", target=name)

    @admin.display(description="directory / URL")
    def target(self, obj: ModelConfig) -> str:
        return obj.path or obj.base_url

    @admin.display(boolean=True, description="API key")
    def has_api_key(self, obj: ModelConfig) -> bool:
        return bool(obj.api_key)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Conversations are the users' record: staff may read them and delete
    a whole conversation, never write into one."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    can_delete = False
    fields = ("role", "model_name", "status", "finish_reason", "content", "queued_at", "finished_at")
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(ReadOnlyAdmin):
    list_display = ("id", "user", "title", "created_at", "updated_at")
    list_display_links = ("id", "title")
    list_filter = ("user", "messages__model_name", "messages__status")
    search_fields = ("title", "user__username")
    inlines = [MessageInline]


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = ("id", "conversation", "user", "role", "model_name", "status", "finish_reason", "queued_at",
                    "finished_at")
    list_filter = ("status", "role", "model_name", "conversation__user")
    list_select_related = ("conversation__user",)
    search_fields = ("content", "conversation__title")

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # a message goes with its conversation

    @admin.display(description=_("user"), ordering="conversation__user")
    def user(self, obj: Message):
        return obj.conversation.user


# --- knowledge bases (issue 15): staff see every base ---------------------------

class KnowledgeDocumentInline(admin.TabularInline):
    model = KnowledgeDocument
    fields = ("name", "size", "status", "chunk_count", "error_code", "error")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False  # files come through the page or /api/knowledge/, which index them


@admin.register(KnowledgeBase)
class KnowledgeBaseAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "status", "chunk_count", "embedding_model", "dimension", "created_at")
    list_filter = ("status", "embedding_model")
    search_fields = ("name", "user__username")
    readonly_fields = ("user", "status", "embedding_model", "dimension", "index_path", "chunk_count", "error",
                       "created_at", "updated_at")
    fields = ("name", *readonly_fields)
    inlines = [KnowledgeDocumentInline]

    def has_add_permission(self, request) -> bool:
        return False

    def delete_model(self, request, obj) -> None:
        from chat.knowledge.bases import base_delete

        base_delete(base=obj)

    def delete_queryset(self, request, queryset) -> None:
        from chat.knowledge.bases import base_delete

        for base in queryset:
            base_delete(base=base)


@admin.register(Translation)
class TranslationAdmin(ReadOnlyAdmin):
    list_display = ("message", "target", "engine", "device", "seconds", "created_at")
    list_filter = ("target", "engine")


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    """The audit log (chat/audit.py): read-only, and kept: nobody edits or
    deletes the record of what was done."""

    list_display = ("at", "username", "action", "target", "detail")
    list_filter = ("action", "username")
    search_fields = ("username", "action", "target")
    date_hierarchy = "at"
    fields = ("at", "username", "user", "action", "target", "detail")
    readonly_fields = fields

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
