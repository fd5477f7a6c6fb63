import secrets

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone


class ModelKind(models.TextChoices):
    LOCAL = "local", "Local chat model (transformers)"
    OLLAMA = "ollama", "Ollama server"
    OPENAI = "openai", "OpenAI-compatible endpoint"
    EMBEDDING = "embedding", "Local embedding model (transformers)"
    TRANSLATION = "translation", "Local translation model (transformers)"


#: The kinds loaded in-process by the GPU worker (a model directory each),
#: and what the GPU manager calls each engine (gpu_manager/state.py LocalSpec).
LOCAL_KINDS = (ModelKind.LOCAL, ModelKind.EMBEDDING, ModelKind.TRANSLATION)
ENGINE_OF_KIND = {ModelKind.LOCAL: "chat", ModelKind.EMBEDDING: "embedding", ModelKind.TRANSLATION: "translation"}
#: The kinds that are outside servers whose models are discovered.
ENDPOINT_KINDS = (ModelKind.OLLAMA, ModelKind.OPENAI)


class ModelConfig(models.Model):
    """One local model, or one outside server whose models are discovered.

    A local row is one model: users pick it by `name`. An Ollama or OpenAI row
    is an endpoint: its models are discovered (`/api/tags`, `/v1/models`) and
    offered as `ollama_<tag>` / `openai_<id>` (CONTRACT §3).
    """

    kind = models.CharField(max_length=12, choices=ModelKind.choices)
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
    pooling = models.CharField(
        max_length=4, choices=[("mean", "mean of the tokens"), ("cls", "first token (CLS)")], default="mean",
        help_text="Embedding models: what the model card asks for (mean for e5 and most bge models).",
    )
    query_prefix = models.CharField(
        max_length=50, blank=True, help_text='Embedding models: put before a query (e5: "query: ").')
    passage_prefix = models.CharField(
        max_length=50, blank=True, help_text='Embedding models: put before a passage (e5: "passage: ").')
    targets = models.CharField(
        "translation targets", max_length=20, blank=True,
        help_text=("Translation models: the target a one-direction model translates into (en or zh-hans; "
                   "opus-mt-zh-en: en). Blank for a multilingual model (M2M100), which serves both."),
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
        if self.kind in LOCAL_KINDS and not self.path:
            raise ValidationError({"path": "A local model needs its model directory."})
        if self.kind in ENDPOINT_KINDS and not self.base_url:
            raise ValidationError({"base_url": "An endpoint needs its base URL."})
        if self.temperature < 0:
            raise ValidationError({"temperature": "Must be 0 or more."})
        if not 0 < self.top_p <= 1:
            raise ValidationError({"top_p": "Must be in (0, 1]."})
        unknown = set(self.target_list()) - {"en", "zh-hans"}
        if unknown:
            raise ValidationError({"targets": f"Unknown targets {sorted(unknown)}: use en, zh-hans or both."})

    def target_list(self) -> list[str]:
        return [t for t in self.targets.replace(",", " ").split() if t]

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
    #: The knowledge bases this reply draws on (CONTRACT §8), and the
    #: passages retrieved for it: null until retrieval ran ([] when none matched).
    knowledge = models.JSONField(null=True, blank=True)
    sources = models.JSONField(null=True, blank=True)
    #: A `/v1` request's options for this reply, checked and in the
    #: backend-neutral form of chat/params.py (null for the chat page's
    #: messages, which take the model's admin defaults).
    params = models.JSONField(null=True, blank=True)
    #: The tool calls the reply asks for, in OpenAI's form (issue 16).
    tool_calls = models.JSONField(null=True, blank=True)

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


# --- The OpenAI-compatible API and its batches (CONTRACT §6, issue 5) ---------

def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"  # OpenAI's id shapes: file-…, batch_…


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


class ApiKey(models.Model):
    """A key for `Authorization: Bearer …`. Only its SHA-256 is stored: the
    key is 256 random bits, so a slow password hash would add nothing but
    latency to every request (the key is shown once, at creation)."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, editable=False, help_text="The key's first characters, to tell keys apart.")
    digest = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    #: Written at most once per API_KEY_TOUCH_SECONDS (chat/api/keys.py).
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Empty: the key never expires.")

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user}{', ' + self.state if self.state != 'live' else ''})"

    @property
    def state(self) -> str:
        """"live", "revoked" or "expired"."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= timezone.now():
            return "expired"
        return "live"


class AuditEntry(models.Model):
    """Who did what to the running service, and when (issue 17): the
    admin's GPU actions and changes to model configuration and API keys.
    Written by chat/audit.py; read-only in the admin."""

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    #: Kept when the user is deleted: the record outlives the account.
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    username = models.CharField(max_length=150, help_text="As it was when the action was taken.")
    action = models.CharField(max_length=50, db_index=True)
    target = models.CharField(max_length=200, blank=True)
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        verbose_name = "audit entry"
        verbose_name_plural = "audit log"

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.username} {self.action} {self.target}"


class BatchFile(models.Model):
    """A file of the Files API: an uploaded batch input, or a batch's output
    or error file. Kept in the database, which every process already shares
    (the web server writes inputs, a worker writes results)."""

    class Purpose(models.TextChoices):
        BATCH = "batch"
        BATCH_OUTPUT = "batch_output"
        BATCH_ERROR = "batch_error"

    id = models.CharField(primary_key=True, max_length=40, default=new_file_id, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="batch_files")
    purpose = models.CharField(max_length=20, choices=Purpose.choices)
    filename = models.CharField(max_length=255)
    bytes = models.PositiveBigIntegerField(default=0)
    content = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.id} ({self.filename})"


class BatchStatus(models.TextChoices):
    # OpenAI's batch statuses (https://platform.openai.com/docs/api-reference/batch/object).
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


BATCH_FINISHED_STATUSES = (BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)


class Batch(models.Model):
    class Order(models.TextChoices):
        GROUPED = "grouped", "grouped by GPU owner"
        ARRIVAL = "arrival", "in file order"

    id = models.CharField(primary_key=True, max_length=40, default=new_batch_id, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="batches")
    endpoint = models.CharField(max_length=100)
    completion_window = models.CharField(max_length=10, default="24h")
    input_file = models.ForeignKey(BatchFile, on_delete=models.PROTECT, related_name="+")
    output_file = models.ForeignKey(BatchFile, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    error_file = models.ForeignKey(BatchFile, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    status = models.CharField(max_length=12, choices=BatchStatus.choices, default=BatchStatus.VALIDATING)
    order = models.CharField(max_length=10, choices=Order.choices, default=Order.GROUPED)
    errors = models.JSONField(null=True, blank=True)
    metadata = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    in_progress_at = models.DateTimeField(null=True, blank=True)
    finalizing_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    cancelling_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "batches"

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"


class BatchLine(models.Model):
    """One line of a batch's input file. A valid line becomes a Message
    (through `chat.services.message_enqueue`) when its turn comes; its result
    is that Message's end. Invalid lines and lines cancelled before their
    turn end here, without a Message."""

    class State(models.TextChoices):
        PENDING = "pending"  # valid, waiting for its turn
        DISPATCHED = "dispatched"  # has its Message: the Message says how it ended
        INVALID = "invalid"
        FAILED = "failed"  # could not be queued: its model went away after validation
        CANCELLED = "cancelled"  # the batch was cancelled before its turn

    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="lines")
    line = models.PositiveIntegerField(help_text="1-based line number in the input file.")
    custom_id = models.CharField(max_length=512, blank=True)
    model_name = models.CharField(max_length=200, blank=True)
    #: The GPU owner the line's model needs ("" for one that needs none);
    #: `rank` orders the groups of a batch run grouped by owner.
    owner = models.CharField(max_length=10, blank=True)
    rank = models.PositiveSmallIntegerField(default=0)
    body = models.JSONField(null=True, blank=True)
    state = models.CharField(max_length=10, choices=State.choices)
    error_code = models.CharField(max_length=50, blank=True)
    error_message = models.TextField(blank=True)
    message = models.OneToOneField(Message, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="batch_line")
    #: An embeddings line's result body (a `/v1/embeddings` line has no Message).
    response = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["batch", "line"]
        constraints = [models.UniqueConstraint(fields=["batch", "line"], name="batch_line_unique")]
        indexes = [models.Index(fields=["batch", "state", "rank", "line"])]

    def __str__(self) -> str:
        return f"{self.batch_id} line {self.line} ({self.state})"


# --- Knowledge bases and translations (CONTRACT §8, §9; issue 15) ------------

class KnowledgeStatus(models.TextChoices):
    INDEXING = "indexing"
    READY = "ready"
    ERROR = "error"


class KnowledgeBase(models.Model):
    """A user's set of documents, searchable by a reply. Its chunks live in
    the database; its searchable index (vectors and BM25) on disk, under
    KNOWLEDGE_DIR, built by the knowledge worker (chat/knowledge/ingest.py)
    with one embedding model, which the index records."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="knowledge_bases")
    name = models.CharField(max_length=200)
    status = models.CharField(max_length=10, choices=KnowledgeStatus.choices, default=KnowledgeStatus.INDEXING)
    #: The embedding model (a ModelConfig name) and dimension of the index.
    embedding_model = models.CharField(max_length=100, blank=True)
    dimension = models.PositiveIntegerField(default=0)
    #: The current index's directory (relative to KNOWLEDGE_DIR); "" before the first.
    index_path = models.CharField(max_length=300, blank=True)
    chunk_count = models.PositiveIntegerField("chunks", default=0)
    #: Where its last ingestion embedded: "gpu worker on cuda:0", "knowledge worker on cpu".
    indexed_by = models.CharField(max_length=100, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "knowledge base"

    def __str__(self) -> str:
        return f"{self.name} ({self.user}, {self.status})"


class KnowledgeDocument(models.Model):
    """One uploaded file of a base. Its bytes are kept until it is indexed
    (or failed); its chunks (KnowledgeChunk) appear only with the index that
    holds them: nothing is half indexed."""

    base = models.ForeignKey(KnowledgeBase, on_delete=models.CASCADE, related_name="documents")
    name = models.CharField(max_length=255)
    size = models.PositiveBigIntegerField(default=0)
    data = models.BinaryField(blank=True, editable=False)
    status = models.CharField(max_length=10, choices=KnowledgeStatus.choices, default=KnowledgeStatus.INDEXING)
    error_code = models.CharField(max_length=50, blank=True)
    error = models.TextField(blank=True)
    #: 0..1 while it is indexed.
    progress = models.FloatField(default=0.0)
    chunk_count = models.PositiveIntegerField("chunks", default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.status})"


class KnowledgeChunk(models.Model):
    """A passage of a document, as it is embedded and shown as a source.
    `position`: its row in the base's current index."""

    base = models.ForeignKey(KnowledgeBase, on_delete=models.CASCADE, related_name="chunks")
    document = models.ForeignKey(KnowledgeDocument, on_delete=models.CASCADE, related_name="chunks")
    seq = models.PositiveIntegerField()
    position = models.PositiveIntegerField()
    text = models.TextField()

    class Meta:
        ordering = ["base", "position"]
        constraints = [models.UniqueConstraint(fields=["base", "position"], name="knowledge_chunk_position")]


class Translation(models.Model):
    """A message translated (CONTRACT §9): computed once per target."""

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="translations")
    target = models.CharField(max_length=10)
    text = models.TextField()
    engine = models.CharField(max_length=100)
    device = models.CharField(max_length=20, blank=True)
    seconds = models.FloatField(default=0.0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["message", "target"], name="translation_once")]
