"""`manage.py demo_model`: create the demo local model `local_demo` if it is
missing, and the admin row that offers it. `make run` calls it."""
from django.conf import settings
from django.core.management.base import BaseCommand

from chat.models import ModelConfig, ModelKind
from gpu_manager.demo_model import DEMO_MODEL_NAME, demo_model_create


def demo_model_ensure() -> ModelConfig:
    path = demo_model_create(path=settings.DEMO_MODEL_DIR)
    config, _ = ModelConfig.objects.get_or_create(
        name=DEMO_MODEL_NAME,
        defaults={
            "kind": ModelKind.LOCAL,
            "path": str(path),
            "is_default": not ModelConfig.objects.filter(is_default=True).exists(),
            # Greedy decoding: the demo's random weights give the same reply
            # every time, which makes it a fair thing to measure and test.
            "temperature": 0.0,
            "max_new_tokens": 256,
        },
    )
    return config


class Command(BaseCommand):
    help = "Create the demo local model (local_demo) and its admin row if missing."

    def handle(self, *args, **options) -> None:
        config = demo_model_ensure()
        self.stdout.write(f"{config.name}: {config.path}")
