from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models


class ModelKind(models.TextChoices):
    LOCAL = "local", "Local (transformers)"
    OLLAMA = "ollama", "Ollama server"
    OPENAI = "openai", "OpenAI-compatible endpoint"


class ModelConfig(models.Model):
    """One local model, or one outside server whose models are discovered.

    A local row is one model: users pick it by `name`. An Ollama or OpenAI row
    is an endpoint: its models are discovered (`/api/tags`, `/v1/models`) and
    offered as `ollama_<tag>` / `openai_<id>` (CONTRACT §3).
    """

    kind = models.CharField(max_length=10, choices=ModelKind.choices)
    name = models.SlugField(
        max_length=100,
        unique=True,
        help_text="Local model: the name users pick. Endpoint: a label for this server.",
    )
    path = models.CharField(
        "model directory", max_length=500, blank=True,
        help_text="Local models: a directory that from_pretrained() can load.",
    )
    base_url = models.URLField(
        blank=True, help_text="Ollama: http://host:11434. OpenAI-compatible: https://host/v1."
    )
    api_key = models.CharField(max_length=500, blank=True, help_text="Never shown back.")
    enabled = models.BooleanField(default=True)
    is_default = models.BooleanField("default", default=False)
    frees_gpu = models.BooleanField(
        "frees the GPU", default=True,
        help_text=(
            "OpenAI-compatible endpoints: unload local models before a request, as the "
            "original system does for any external model. Turn off for remote APIs."
        ),
    )
    keep_alive = models.PositiveIntegerField(
        "keep alive (seconds)", default=300,
        help_text="Local models: unload after this long unused, like Ollama's keep_alive (0 = never).",
    )
    preload = models.BooleanField(
        default=False, help_text="Local models: load this one too whenever the local models take the GPU back.",
    )
    warm_offload = models.BooleanField(
        default=False,
        help_text=(
            "Local models: on unload keep the weights in host memory (pinned on CUDA), so that "
            "taking the GPU back is a copy, not a reload."
        ),
    )
    max_new_tokens = models.PositiveIntegerField(default=512)
    temperature = models.FloatField(default=0.7)
    top_p = models.FloatField(default=0.95)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["kind", "name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.kind})"

    def clean(self) -> None:
        if self.kind == ModelKind.LOCAL and not self.path:
            raise ValidationError({"path": "A local model needs its model directory."})
        if self.kind != ModelKind.LOCAL and not self.base_url:
            raise ValidationError({"base_url": "An endpoint needs its base URL."})
        if self.temperature < 0:
            raise ValidationError({"temperature": "Must be 0 or more."})
        if not 0 < self.top_p <= 1:
            raise ValidationError({"top_p": "Must be in (0, 1]."})

    def generation_defaults(self) -> dict:
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }


class Conversation(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations")
    title = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.pk}"


class MessageStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    ERROR = "error"


FINISHED_STATUSES = (MessageStatus.DONE, MessageStatus.CANCELLED, MessageStatus.ERROR)


class Message(models.Model):
    """A user turn, or the assistant reply that a task fills in."""

    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=10, choices=Role.choices)
    content = models.TextField(blank=True)
    model_name = models.CharField(max_length=200, blank=True)
    client_id = models.CharField(max_length=100, blank=True)
    status = models.CharField(max_length=10, choices=MessageStatus.choices, default=MessageStatus.DONE)
    finish_reason = models.CharField(max_length=20, blank=True)
    error_code = models.CharField(max_length=50, blank=True)
    error_detail = models.TextField(blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    first_token_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["status"])]

    def __str__(self) -> str:
        return f"{self.role} #{self.pk} ({self.status})"

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    def usage(self) -> dict:
        prompt, completion = self.prompt_tokens or 0, self.completion_tokens or 0
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
