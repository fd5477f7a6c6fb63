from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The API's admin pages live in their own module (issue 5).
        from chat import admin_batches  # noqa: F401
