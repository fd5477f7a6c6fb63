"""`python manage.py create_api_key USERNAME` (CONTRACT §6): print a new key."""
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from chat.api.keys import api_key_create


class Command(BaseCommand):
    help = "Create an API key for USERNAME and print it (it is stored hashed and cannot be shown again)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="", help="a label for the key, shown in the admin")
        parser.add_argument("--expires-in-days", type=float, default=None,
                            help="refuse the key after this many days (default: it never expires)")

    def handle(self, *args, **options):
        user = get_user_model().objects.filter(username=options["username"]).first()
        if user is None:
            raise CommandError(f"No user named {options['username']!r}.")
        days = options["expires_in_days"]
        if days is not None and days <= 0:
            raise CommandError("--expires-in-days must be more than 0.")
        expires_at = timezone.now() + timedelta(days=days) if days is not None else None
        _key, raw = api_key_create(user=user, name=options["name"], expires_at=expires_at)
        self.stdout.write(raw)
