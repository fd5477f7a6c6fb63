"""The worker lifecycle's threads (workers/lifecycle.py) survive a database
that dropped their connection: each tick runs inside
`close_old_connections()`, so the tick after a failed one opens a new
connection instead of failing on the dead one for ever."""
from __future__ import annotations

import threading

import pytest
from django.contrib.auth import get_user_model
from django.db import connection, connections

from workers.lifecycle import WorkerLifecycle


def _in_a_thread(work) -> None:
    """Run `work` in a thread of its own, as the lifecycle's threads do (a
    thread has its own database connection), and close it at the end."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # handed to the test's thread
            failure.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive() and not failure, failure


@pytest.mark.django_db(transaction=True)
def test_a_tick_after_the_database_dropped_the_threads_connection_reconnects():
    if connection.vendor != "postgresql":
        pytest.skip("needs a database server that can drop a connection: runs in make test's PostgreSQL pass")
    done: list[str] = []
    pid: list[int] = []

    def tick(name: str):
        def count() -> None:
            get_user_model().objects.count()
            done.append(name)
        return count

    def work() -> None:
        WorkerLifecycle._tick("test-tick", tick("before"))
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pid.append(cursor.fetchone()[0])
        # As a database restart does: the server ends this thread's session.
        killer = connections.create_connection("default")
        try:
            with killer.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(%s)", [pid[0]])
        finally:
            killer.close()
        # Without close_old_connections() around each tick, both of these
        # would fail: the first on the dead connection, the second with
        # "connection already closed", and so would every tick after them.
        WorkerLifecycle._tick("test-tick", tick("after"))
        WorkerLifecycle._tick("test-tick", tick("later"))

    _in_a_thread(work)
    assert done[0] == "before" and done[-1] == "later", done
