"""Project wiring. Importing the Celery app here makes `@shared_task` bind to it
whenever Django starts (Celery's Django guide)."""
from chatsite.celery import app as celery_app

__all__ = ("celery_app",)
