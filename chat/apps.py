from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The API's admin pages live in their own module (issue 5).
        from chat import admin_batches  # noqa: F401

        # An endpoint row saved or deleted: every process's catalog memo is
        # read again (chat/catalog.py). Local rows are read per message.
        from django.db.models.signals import post_delete, post_migrate, post_save

        from chat.catalog import catalog_changed, catalog_flushed
        from chat.models import ModelConfig

        post_save.connect(catalog_changed, sender=ModelConfig, dispatch_uid="catalog_changed_save")
        post_delete.connect(catalog_changed, sender=ModelConfig, dispatch_uid="catalog_changed_delete")
        # A flush (the test runner's, between transactional tests) deletes
        # rows without post_delete, and ends with post_migrate.
        post_migrate.connect(catalog_flushed, sender=self, dispatch_uid="catalog_flushed")
