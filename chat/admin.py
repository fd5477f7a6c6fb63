from django import forms
from django.contrib import admin

from chat.catalog import catalog_forget
from chat.models import Conversation, Message, ModelConfig


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

    class Meta:
        model = ModelConfig
        fields = "__all__"

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
    )

    def save_model(self, request, obj, form, change) -> None:
        super().save_model(request, obj, form, change)
        catalog_forget()  # the picker shows the edit at once, not after the cache TTL

    def delete_model(self, request, obj) -> None:
        super().delete_model(request, obj)
        catalog_forget()

    @admin.display(description="directory / URL")
    def target(self, obj: ModelConfig) -> str:
        return obj.path or obj.base_url

    @admin.display(boolean=True, description="API key")
    def has_api_key(self, obj: ModelConfig) -> bool:
        return bool(obj.api_key)


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    can_delete = False
    fields = ("role", "model_name", "status", "finish_reason", "content", "queued_at", "finished_at")
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ("id", "user", "title", "created_at", "updated_at")
    list_filter = ("user",)
    inlines = [MessageInline]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ("id", "conversation", "role", "model_name", "status", "finish_reason", "queued_at", "finished_at")
    list_filter = ("status", "role", "model_name")
    readonly_fields = (
        "queued_at", "started_at", "first_token_at", "finished_at", "prompt_tokens", "completion_tokens",
    )
