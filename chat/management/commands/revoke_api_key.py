"""`python manage.py revoke_api_key PREFIX`: revoke the key whose shown
prefix (the admin's "prefix" column, e.g. `sk-chat-AbCd`) this is; the
admin's "Revoke the selected keys" does the same from the list."""
from django.core.management.base import BaseCommand, CommandError

from chat.api.keys import api_keys_revoke
from chat.audit import audit_record
from chat.models import ApiKey


class Command(BaseCommand):
    help = "Revoke the API key with this prefix (as the admin shows it); it is refused from the next request on."

    def add_arguments(self, parser):
        parser.add_argument("prefix")

    def handle(self, *args, **options):
        keys = ApiKey.objects.filter(prefix=options["prefix"], revoked_at__isnull=True).select_related("user")
        found = list(keys)
        if not found:
            raise CommandError(f"No live API key has the prefix {options['prefix']!r}.")
        if len(found) > 1:
            # Prefixes can repeat (four random characters): never revoke a
            # key the operator did not mean.
            names = ", ".join(f"{key.name or '(no name)'} of {key.user}" for key in found)
            raise CommandError(f"{len(found)} live keys have this prefix ({names}): revoke the right one in "
                               f"the admin (Chat › API keys).")
        api_keys_revoke(keys=keys)
        key = found[0]
        audit_record(user=None, action="api_key.revoke", target=f"{key.prefix}… of {key.user}",
                     detail={"by": "manage.py revoke_api_key"})
        self.stdout.write(f"Revoked {key.prefix}… ({key.name or 'no name'}) of {key.user}.")
