"""Batches for people without the API:

    python manage.py batch submit FILE.jsonl [--user NAME] [--wait]
    python manage.py batch status BATCH_ID
    python manage.py batch results BATCH_ID [--errors]

The same services as POST /v1/files and /v1/batches (chat/batches.py).
"""
import json
import time
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from chat import batches
from chat.completions import RequestError
from chat.models import BATCH_FINISHED_STATUSES, Batch

#: How often --wait reads the batch (seconds).
WAIT_POLL_SECONDS = 1.0


class Command(BaseCommand):
    help = "Submit a batch file, show a batch's status, or print its results."

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True)
        submit = actions.add_parser("submit", help="upload FILE.jsonl and start a batch")
        submit.add_argument("file", type=Path)
        submit.add_argument("--user", help="whose batch it is (default: the first superuser)")
        submit.add_argument("--wait", action="store_true", help="show progress until the batch ends")
        status = actions.add_parser("status", help="the batch as the API returns it")
        status.add_argument("batch_id")
        results = actions.add_parser("results", help="print the output file (or the error file)")
        results.add_argument("batch_id")
        results.add_argument("--errors", action="store_true", help="print the error file instead")

    def handle(self, *args, **options):
        try:
            getattr(self, options["action"])(**options)
        except RequestError as exc:
            raise CommandError(exc.detail) from exc

    def submit(self, *, file: Path, user: str | None, wait: bool, **_):
        owner = self._user(user)
        if not file.is_file():
            raise CommandError(f"No file {file}.")
        upload = batches.file_create(user=owner, filename=file.name, data=file.read_bytes(), purpose="batch")
        batch = batches.batch_create(user=owner, input_file_id=upload.pk, endpoint="/v1/chat/completions")
        self.stdout.write(batch.pk)
        if wait:
            self._wait(batch.pk)

    def status(self, *, batch_id: str, **_):
        self.stdout.write(json.dumps(batches.batch_object(self._batch(batch_id)), indent=2))

    def results(self, *, batch_id: str, errors: bool, **_):
        batch = self._batch(batch_id)
        file = batch.error_file if errors else batch.output_file
        if file is None:
            raise CommandError(f"{batch_id} ({batch.status}) has no {'error' if errors else 'output'} file.")
        self.stdout.write(file.content, ending="")

    def _wait(self, batch_id: str) -> None:
        shown = None
        while True:
            batch = Batch.objects.get(pk=batch_id)
            counts = batches.batch_counts(batch)
            line = (f"{batch.status}: {counts['completed']} completed, {counts['failed']} failed "
                    f"of {counts['total']}")
            if line != shown:
                self.stderr.write(line)
                shown = line
            if batch.status in BATCH_FINISHED_STATUSES:
                return
            time.sleep(WAIT_POLL_SECONDS)

    def _batch(self, batch_id: str) -> Batch:
        batch = Batch.objects.filter(pk=batch_id).first()
        if batch is None:
            raise CommandError(f"No batch {batch_id}.")
        return batch

    def _user(self, username: str | None):
        users = get_user_model().objects
        found = users.filter(username=username).first() if username else \
            users.filter(is_superuser=True).order_by("pk").first()
        if found is None:
            raise CommandError(f"No user {username!r}." if username else "No superuser; pass --user NAME.")
        return found
