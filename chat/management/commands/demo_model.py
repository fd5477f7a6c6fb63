"""`manage.py demo_model`: create the demo local models if they are missing,
and the admin rows that offer them: `local_demo` (chat), `embed_demo`
(embedding) and `translate_demo` (translation). `make run` calls it."""
from django.conf import settings
from django.core.management.base import BaseCommand

from chat.models import ModelConfig, ModelKind
from gpu_manager.demo_embedder import DEMO_EMBEDDER_NAME, demo_embedder_create
from gpu_manager.demo_model import DEMO_MODEL_NAME, demo_model_create
from gpu_manager.demo_translator import DEMO_TRANSLATOR_NAME, demo_translator_create


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


def demo_engines_ensure() -> list[ModelConfig]:
    """The demo embedding and translation engines (issue 15): preloaded, so
    that they are resident beside the chat model whenever the local models
    hold the GPU, and unloaded with it."""
    configs = []
    for name, kind, create, directory in (
            (DEMO_EMBEDDER_NAME, ModelKind.EMBEDDING, demo_embedder_create, settings.DEMO_EMBEDDER_DIR),
            (DEMO_TRANSLATOR_NAME, ModelKind.TRANSLATION, demo_translator_create, settings.DEMO_TRANSLATOR_DIR)):
        path = create(path=directory)
        config, _ = ModelConfig.objects.get_or_create(name=name, defaults={
            "kind": kind, "path": str(path), "preload": True,
            # The demo translator is a Marian model into English and Chinese alike:
            # it serves both targets (its output is random text, as local_demo's).
        })
        configs.append(config)
    return configs


class Command(BaseCommand):
    help = "Create the demo local models (local_demo, embed_demo, translate_demo) and their admin rows if missing."

    def handle(self, *args, **options) -> None:
        for config in [demo_model_ensure(), *demo_engines_ensure()]:
            self.stdout.write(f"{config.name}: {config.path}")
