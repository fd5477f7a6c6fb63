"""/v1/ (CONTRACT §6). Paths carry no trailing slash, as OpenAI's do."""
from django.urls import path, re_path

from chat.api import batches, completions, embeddings
from chat.api.http import not_found

urlpatterns = [
    path("models", completions.models_list, name="v1-models"),
    path("models/<path:model_id>", completions.model_retrieve, name="v1-model"),
    path("chat/completions", completions.chat_completions, name="v1-chat-completions"),
    path("embeddings", embeddings.embeddings, name="v1-embeddings"),
    path("files", batches.files, name="v1-files"),
    path("files/<str:file_id>", batches.file_detail, name="v1-file"),
    path("files/<str:file_id>/content", batches.file_content, name="v1-file-content"),
    path("batches", batches.batches_view, name="v1-batches"),
    path("batches/<str:batch_id>", batches.batch_detail, name="v1-batch"),
    path("batches/<str:batch_id>/cancel", batches.batch_cancel, name="v1-batch-cancel"),
    re_path(r"", not_found),
]
