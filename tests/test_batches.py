"""Batches (OpenAI's Batch API) through the official `openai` client against
the running stack: validation, results, cancel, interactive chat during a
batch, GPU switches grouped by owner, a worker killed mid-batch, and the
`manage.py batch` command."""
import json
import random
import signal
import time
from types import SimpleNamespace

import pytest
from django.conf import settings
from django.contrib.admin.utils import quote
from django.core.management import call_command
from django.test import override_settings
from django.urls import reverse

from chat import batches
from chat.catalog import model_resolve
from chat.models import Batch, BatchFile, BatchLine, BatchStatus, Conversation, Message, ModelConfig
from chatsite.redis_client import redis_client
from gpu_manager.state import GpuStateStore
from tests.support.api import jsonl, request_line, switches_since, wait_batch
from tests.support.users import superuser_create
from tests.support.waiting import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

MODELS = ("local_demo", "ollama_qwen:7b", "openai_gpt-4o-mini")


@pytest.fixture
def small_demo(demo_model):
    """The demo model answering in 8 tokens (~20 ms), so that hundreds of
    lines take seconds."""
    ModelConfig.objects.filter(pk=demo_model.pk).update(max_new_tokens=8)
    return demo_model


def submit(api, lines, **create) -> str:
    upload = api.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes == len(jsonl(lines))
    return api.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                              completion_window="24h", **create).id


def results(api, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in api.files.content(file_id).text.splitlines()]


def mixed_lines(count: int, *, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [request_line(f"req-{i}", rng.choice(MODELS), f"question {i}") for i in range(count)]


def minimal_switches(lines: list[dict]) -> int:
    """Owner changes a grouped run needs: one per owner the lines need,
    less one when the GPU's current owner is among them."""
    owners = {model_resolve(line["body"]["model"]).needs_gpu_owner for line in lines} - {None}
    return len(owners) - (GpuStateStore(slot=settings.GPU_SLOT).read().owner in owners)


def test_batch_round_trip_with_the_openai_client(api, small_demo, workers, stack):
    lines = [request_line("a", "local_demo"), request_line("b", "ollama_qwen:7b"),
             request_line("c", "openai_gpt-4o-mini", "hi there")]
    batch_id = submit(api, lines, metadata={"job": "nightly"})
    batch = wait_batch(api, batch_id)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 3 and batch.request_counts.completed == 3
    assert batch.request_counts.failed == 0 and batch.error_file_id is None
    assert batch.metadata == {"job": "nightly"} and batch.completed_at >= batch.in_progress_at
    output = {r["custom_id"]: r for r in results(api, batch.output_file_id)}
    assert set(output) == {"a", "b", "c"}
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in output.values())
    assert output["b"]["response"]["body"]["choices"][0]["message"]["content"] == stack.ollama.reply
    assert output["c"]["response"]["body"]["choices"][0]["message"]["content"] == stack.openai.reply
    assert output["a"]["response"]["body"]["model"] == "local_demo"
    assert batch_id in [b.id for b in api.batches.list(limit=5)]
    assert api.files.retrieve(batch.output_file_id).purpose == "batch_output"
    # Each line was a chat message with the batch's priority, like any other.
    replies = Message.objects.filter(batch_line__batch_id=batch_id)
    assert sorted(replies.values_list("model_name", flat=True)) == sorted(MODELS)


def test_invalid_lines_become_error_lines_with_their_numbers(api, small_demo, workers):
    lines = [request_line("ok-1", "local_demo"),                      # 1
             "{this is not json",                                      # 2
             request_line("ok-1", "local_demo"),                      # 3 duplicate custom_id
             request_line("x", "no-such-model"),                      # 4
             request_line("y", "local_demo", url="/v1/embeddings"),  # 5
             {"method": "POST", "url": "/v1/chat/completions"},       # 6 no custom_id
             request_line("ok-2", "ollama_qwen:7b")]                  # 7
    batch = wait_batch(api, submit(api, lines))
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (7, 2, 5)
    assert sorted(r["custom_id"] for r in results(api, batch.output_file_id)) == ["ok-1", "ok-2"]
    errors = {r["error"]["line"]: r for r in results(api, batch.error_file_id)}
    assert sorted(errors) == [2, 3, 4, 5, 6]
    assert {n: errors[n]["error"]["code"] for n in errors} == {
        2: "invalid_json", 3: "duplicate_custom_id", 4: "model_not_found", 5: "invalid_url", 6: "missing_custom_id"}
    assert all(f"Line {n}" in errors[n]["error"]["message"] for n in errors)
    assert [e.line for e in batch.errors.data] == [2, 3, 4, 5, 6]


def test_a_batch_without_a_valid_line_fails_validation(api, small_demo, workers):
    batch = wait_batch(api, submit(api, ["nope", request_line("z", "no-such-model")]))
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
    assert [(e.line, e.code) for e in batch.errors.data] == [(1, "invalid_json"), (2, "model_not_found")]
    assert [r["error"]["line"] for r in results(api, batch.error_file_id)] == [1, 2]
    assert not Message.objects.exists()


def test_cancel_lets_in_flight_lines_finish_and_keeps_partial_output(api, small_demo, workers):
    lines = [request_line(f"r{i}", "local_demo") for i in range(200)]
    batch_id = submit(api, lines)
    wait_for(lambda: api.batches.retrieve(batch_id).request_counts.completed >= 10, timeout=60,
             what="ten completed lines")
    cancelling = api.batches.cancel(batch_id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait_batch(api, batch_id)
    assert batch.status == "cancelled" and batch.cancelled_at
    output, errors = results(api, batch.output_file_id), results(api, batch.error_file_id)
    # Every line once, in one of the files; what had run is kept.
    assert sorted(r["custom_id"] for r in output + errors) == sorted(f"r{i}" for i in range(200))
    assert len(output) >= 10 and len(errors) > 100
    assert {r["error"]["code"] for r in errors} == {"batch_cancelled"}
    counts = batch.request_counts
    assert (counts.completed, counts.failed) == (len(output), len(errors))
    # No more than a window of lines ran after the cancel.
    assert len(output) <= counts.completed and len(output) < 10 + 2 * settings.BATCH_MAX_IN_FLIGHT + 20


@pytest.mark.timeout(300)
def test_500_mixed_lines_complete_with_the_fewest_gpu_switches(api, small_demo, workers):
    lines = mixed_lines(500, seed=5)
    expected = minimal_switches(lines)
    since = time.time()
    started = time.monotonic()
    batch = wait_batch(api, submit(api, lines), timeout=240)
    seconds = time.monotonic() - started
    assert batch.status == "completed" and batch.request_counts.completed == 500
    output = results(api, batch.output_file_id)
    assert len(output) == 500 and sorted(r["custom_id"] for r in output) == sorted(f"req-{i}" for i in range(500))
    assert batch.error_file_id is None
    switches = switches_since(since)
    print(f"\n500 mixed lines in {seconds:.1f} s ({500 / seconds:.0f} lines/s); switches {switches}, "
          f"minimum owner changes {expected}")
    assert switches["owner_change"] == expected
    assert switches["local_unload"] <= 1 and switches["ollama_unload"] <= 1


def test_grouping_by_owner_switches_far_less_than_arrival_order(api, small_demo, workers, user):
    """The same file run in file order (each line queued as it comes) and
    grouped by GPU owner (what every batch does). The GPU serves in arrival
    order here (GPU_SCHEDULE=fifo): the batch's own grouping is measured,
    without the GPU scheduler's, which groups the lines in flight as well."""
    lines = mixed_lines(40, seed=7)
    upload = batches.file_create(user=user, filename="same.jsonl", data=jsonl(lines), purpose="batch")
    counts = {}
    with workers.restarted_with(("gpu", "cpu"), GPU_SCHEDULE="fifo"), override_settings(GPU_SCHEDULE="fifo"):
        for order in (Batch.Order.ARRIVAL, Batch.Order.GROUPED):
            expected = minimal_switches(lines)
            since = time.time()
            batch = batches.batch_create(user=user, input_file_id=upload.pk, endpoint="/v1/chat/completions",
                                         order=order)
            assert wait_batch(api, batch.pk).status == "completed"
            counts[order] = switches_since(since)
    print(f"\n40 mixed lines: in file order {counts['arrival']}, grouped {counts['grouped']} (minimum owner "
          f"changes {expected})")
    assert counts["grouped"]["owner_change"] == expected
    assert counts["arrival"]["owner_change"] >= 5 * max(expected, 1)


def test_a_chat_message_during_a_large_batch_is_answered_promptly(api, small_demo, workers):
    lines = [request_line(f"bulk-{i}", "local_demo") for i in range(400)]
    batch_id = submit(api, lines)
    wait_for(lambda: api.batches.retrieve(batch_id).request_counts.completed >= 20, timeout=60,
             what="the batch to be well under way")
    before = api.batches.retrieve(batch_id).request_counts
    started = time.monotonic()
    reply = api.chat.completions.create(model="local_demo", messages=[{"role": "user", "content": "me first"}])
    latency = time.monotonic() - started
    after = api.batches.retrieve(batch_id).request_counts
    api.batches.cancel(batch_id)
    per_line = None
    done = Message.objects.filter(batch_line__batch_id=batch_id, status="done").order_by("finished_at")
    first, last = done.first(), done.last()
    if first and last and done.count() > 1:
        per_line = (last.finished_at - first.finished_at).total_seconds() / (done.count() - 1)
    remaining = after.total - after.completed - after.failed
    print(f"\nchat reply in {latency * 1000:.0f} ms while the batch had {remaining} lines left "
          f"(~{per_line * 1000:.0f} ms each, {remaining * per_line:.1f} s of work); "
          f"{after.completed - before.completed} lines ran meanwhile")
    assert reply.choices[0].message.content
    # Answered after the line the GPU worker was on, not after the batch:
    # within a few lines' time, a small fraction of the work left.
    assert remaining > 200
    assert latency < 4 * per_line + 2.0 and latency < remaining * per_line / 10
    wait_batch(api, batch_id)


def test_a_gpu_worker_killed_mid_batch_loses_no_line(api, small_demo, workers):
    ModelConfig.objects.filter(pk=small_demo.pk).update(max_new_tokens=24)  # long enough to be caught running
    lines = [request_line(f"k{i}", "local_demo") for i in range(20)]
    batch_id = submit(api, lines)
    wait_for(lambda: Message.objects.filter(batch_line__batch_id=batch_id, status="running").exists()
             and api.batches.retrieve(batch_id).request_counts.completed >= 2,
             timeout=60, what="a line running on the GPU worker")
    proc = workers.procs.pop("gpu")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    workers.start("gpu")
    batch = wait_batch(api, batch_id, timeout=120)
    assert batch.status == "completed"
    output, errors = results(api, batch.output_file_id), results(api, batch.error_file_id)
    assert sorted(r["custom_id"] for r in output + errors) == sorted(f"k{i}" for i in range(20))
    # The line the worker died on ends once, with the error that says so.
    assert len(errors) <= 1
    assert all(r["response"]["status_code"] >= 500 for r in errors)


def test_batch_command_line(small_demo, workers, user, tmp_path, capsys):
    user.is_superuser = True
    user.save()
    path = tmp_path / "requests.jsonl"
    path.write_bytes(jsonl([request_line("cli-1", "local_demo"), request_line("cli-2", "openai_gpt-4o-mini"),
                            "broken"]))
    call_command("batch", "submit", str(path), "--wait")
    batch_id = capsys.readouterr().out.strip()
    assert Batch.objects.get(pk=batch_id).status == "completed"
    call_command("batch", "status", batch_id)
    status = json.loads(capsys.readouterr().out)
    assert status["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    call_command("batch", "results", batch_id)
    assert sorted(json.loads(line)["custom_id"] for line in capsys.readouterr().out.splitlines()) == ["cli-1", "cli-2"]
    call_command("batch", "results", batch_id, "--errors")
    assert json.loads(capsys.readouterr().out)["error"]["line"] == 3


def test_admin_shows_batches_with_progress_and_downloads(client, user):
    admin = superuser_create("root", "pw-root-123", email="root@example.com")
    client.force_login(admin)
    upload = batches.file_create(user=user, filename="in.jsonl", data=jsonl([request_line("a", "x")]),
                                 purpose="batch")
    # An id whose "_40" the admin's URL quoting would misread, had its links not been quoted.
    batch = Batch.objects.create(id="batch_40" + "a" * 22, user=user, input_file=upload,
                                 endpoint="/v1/chat/completions", status="in_progress")
    BatchLine.objects.create(batch=batch, line=1, custom_id="a", state="invalid", error_code="model_not_found")
    page = client.get("/admin/chat/batch/")
    assert page.status_code == 200 and b"<progress" in page.content and batch.pk.encode() in page.content
    # The admin quotes primary keys in its URLs ("batch_40…" would read as "batch@…" unquoted).
    detail = client.get(reverse("admin:chat_batch_change", args=[quote(batch.pk)]))
    assert detail.status_code == 200 and b"0 done, 1 failed of 1" in detail.content
    download = client.get(f"/admin/chat/batchfile/{upload.pk}/download/")
    assert download.status_code == 200 and download.content == jsonl([request_line("a", "x")])
    assert BatchFile.objects.filter(pk=upload.pk).exists()

    # An API key made in the admin is shown once, then only its prefix.
    answer = client.post("/admin/chat/apikey/add/", {"user": user.pk, "name": "from admin"}, follow=True)
    shown = [str(m) for m in answer.context["messages"]]
    key = user.api_keys.get()
    assert any(key.prefix in m and "cannot be shown again" in m for m in shown)
    client.post("/admin/chat/apikey/", {"action": "revoke", "_selected_action": [key.pk]})
    key.refresh_from_db()
    assert key.revoked_at is not None


# --- the advance's own costs (no workers: the broker is stubbed) -------------

@pytest.fixture
def sent_tasks(monkeypatch):
    """Tasks sent through the Celery app, recorded instead of queued."""
    sent = []
    monkeypatch.setattr(batches.app, "signature", lambda name, **options: SimpleNamespace(
        apply_async=lambda: sent.append((name, options))))
    return sent


def batch_in_progress(user, lines: list[dict]) -> Batch:
    upload = batches.file_create(user=user, filename="in.jsonl", data=jsonl(lines), purpose="batch")
    batch = Batch.objects.create(user=user, input_file=upload, endpoint="/v1/chat/completions",
                                 status=BatchStatus.IN_PROGRESS, expires_at=upload.created_at)
    BatchLine.objects.bulk_create(BatchLine(batch=batch, line=n, custom_id=line["custom_id"], body=line["body"],
                                            model_name=line["body"]["model"], state=BatchLine.State.PENDING)
                                  for n, line in enumerate(lines, start=1))
    return batch


def test_line_ends_during_an_advance_queue_no_task(user, sent_tasks):
    """A line's end while the batch's advance runs only marks the batch
    (the advance looks again before it leaves); with none running, the first
    end queues one task, and the ends before that task starts queue none."""
    batch_id = "batch_coalesce" + "0" * 17
    r = redis_client()
    mark, lock, queued = f"batch:changed:{batch_id}", f"batch:lock:{batch_id}", f"batch:queued:{batch_id}"
    r.delete(mark, lock, queued)
    r.set(lock, "an advance running", ex=30)
    for _ in range(20):
        batches.batch_advance_queue(batch_id=batch_id)
    assert sent_tasks == [] and r.exists(mark)
    r.delete(lock, mark)
    for _ in range(20):
        batches.batch_advance_queue(batch_id=batch_id)
    assert [options["args"] for _, options in sent_tasks] == [(batch_id,)] and r.exists(mark)
    # The task starts (no such batch: it looks and leaves); the next end queues again.
    batches.batch_advance(batch_id=batch_id)
    assert not r.exists(mark) and not r.exists(lock) and not r.exists(queued)
    batches.batch_advance_queue(batch_id=batch_id)
    assert len(sent_tasks) == 2
    # The watchdog is always a task, whatever runs.
    r.set(lock, "an advance running", ex=30)
    batches.batch_advance_queue(batch_id=batch_id, countdown=7.0)
    assert len(sent_tasks) == 3 and sent_tasks[-1][1]["countdown"] == 7.0
    r.delete(mark, lock, queued)


def test_a_cancel_stops_the_filling_within_a_few_lines_whatever_the_window(user, monkeypatch):
    lines = [request_line(f"w{i}", "openai_gpt-4o-mini") for i in range(60)]
    batch = batch_in_progress(user, lines)
    taken = []

    def lines_dispatch(batch, lines):
        for line in lines:
            taken.append(line.line)
            BatchLine.objects.filter(pk=line.pk).update(state=BatchLine.State.DISPATCHED)
            if len(taken) == 3:  # a cancel, as POST /v1/batches/<id>/cancel makes it, mid-fill
                Batch.objects.filter(pk=batch.pk).update(status=BatchStatus.CANCELLING)
        return len(lines)

    monkeypatch.setattr(batches, "_lines_dispatch", lines_dispatch)
    with override_settings(BATCH_MAX_IN_FLIGHT=50):
        batches._fill(Batch.objects.select_related("user").get(pk=batch.pk))
    assert 3 <= len(taken) <= 3 + batches.FILL_STATUS_EVERY < 50


def test_a_line_taken_meanwhile_leaves_no_message_behind(user, sent_tasks):
    """The claim is the update that links the Message: a line another
    advance took (its lock expired) rolls this one's Message back, and its
    queueing with it, and only its own: the lines dispatched with it in
    the same transaction are queued."""
    batch = batch_in_progress(user, [request_line(f"t{n}", "openai_gpt-4o-mini") for n in (1, 2, 3)])
    stale, fresh, last = BatchLine.objects.filter(batch=batch).order_by("line")
    BatchLine.objects.filter(pk=stale.pk).update(state=BatchLine.State.DISPATCHED)  # the other advance's
    batch = Batch.objects.select_related("user").get(pk=batch.pk)
    assert batches._lines_dispatch(batch, [stale]) == 0
    assert not Message.objects.exists() and not Conversation.objects.exists() and sent_tasks == []
    assert BatchLine.objects.get(pk=stale.pk).message is None
    # Pending lines get their Messages, linked, each queued once; the taken one nothing.
    assert batches._lines_dispatch(batch, [fresh, stale, last]) == 2
    for line in (fresh, last):
        line.refresh_from_db()
        assert line.state == BatchLine.State.DISPATCHED and line.message.status == "queued"
    assert BatchLine.objects.get(pk=stale.pk).message is None
    assert Conversation.objects.count() == 2
    queued = [options.get("args") for _, options in sent_tasks]
    assert sorted(queued) == [(fresh.message_id,), (last.message_id,)]


def test_a_long_advance_renews_its_lock_and_hands_over(sent_tasks, monkeypatch):
    """An advance passes again while line ends keep marking the batch; it
    renews its lock every pass (another advance cannot start beside it) and
    after half the lock's TTL leaves the rest to a new task."""
    batch_id = "batch_handover" + "0" * 17
    r = redis_client()
    mark, lock = f"batch:changed:{batch_id}", f"batch:lock:{batch_id}"
    r.delete(mark, lock, f"batch:queued:{batch_id}")
    ttls = []

    def advance(batch_id):
        ttls.append(r.pttl(lock))
        time.sleep(0.3)
        if len(ttls) < 12:
            r.set(mark, "1")  # a line ended meanwhile

    monkeypatch.setattr(batches, "_advance", advance)
    with override_settings(BATCH_LOCK_SECONDS=2):
        batches.batch_advance(batch_id=batch_id)
    assert 2 <= len(ttls) <= 5, ttls
    assert min(ttls) > 1500, ttls  # renewed: without it the third pass would see ~1400 ms left
    # Handed over: the lock is free, the batch marked, and one task queued to go on.
    assert not r.exists(lock) and r.exists(mark)
    assert [options["args"] for _, options in sent_tasks] == [(batch_id,)]
    r.delete(mark, f"batch:queued:{batch_id}")
