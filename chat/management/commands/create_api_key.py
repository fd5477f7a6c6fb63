"""`python manage.py create_api_key USERNAME` (CONTRACT §6): print a new key."""
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from chat.api.keys import api_key_create


class Command(BaseCommand):
    help = "Create an API key for USERNAME and print it (it is stored hashed and cannot be shown again)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="", help="a label for the key, shown in the admin")

    def handle(self, *args, **options):
        user = get_user_model().objects.filter(username=options["username"]).first()
        if user is None:
            raise CommandError(f"No user named {options['username']!r}.")
        _key, raw = api_key_create(user=user, name=options["name"])
        self.stdout.write(raw)
