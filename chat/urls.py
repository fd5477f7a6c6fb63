from django.urls import path
from django.views.i18n import JavaScriptCatalog, set_language

from chat import views
from chat.knowledge import views as knowledge_views

urlpatterns = [
    path("", views.index, name="index"),
    path("c/<int:conversation_id>/", views.index, name="conversation"),
    path("api/gpu/", views.api_gpu, name="api-gpu"),
    path("api/models/", views.api_models, name="api-models"),
    path("api/conversations/", views.api_conversations, name="api-conversations"),
    path("api/conversations/<int:conversation_id>/", views.api_conversation, name="api-conversation"),
    path("api/messages/<int:message_id>/", views.api_message, name="api-message"),
    path("api/knowledge/", knowledge_views.api_knowledge, name="api-knowledge"),
    path("api/knowledge/<int:base_id>/", knowledge_views.api_knowledge_one, name="api-knowledge-one"),
    path("api/knowledge/<int:base_id>/files", knowledge_views.api_knowledge_files, name="api-knowledge-files"),
    # Django's own language switch (POST language=…) and the chat page's
    # translations for its script (the "djangojs" catalog of this app).
    path("i18n/setlang/", set_language, name="set_language"),
    path("jsi18n/", JavaScriptCatalog.as_view(packages=["chat"]), name="javascript-catalog"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
]
