"""The SQLite backend's connections kept between uses (chatsite/dbsqlite3
`_Idle`): reused outside a transaction, never inside one, and never
against a database file that was replaced."""
import sqlite3

import pytest
from django.db import connection

from chatsite.dbsqlite3.base import _Idle

pytestmark = pytest.mark.skipif(connection.vendor != "sqlite", reason="the SQLite backend's own")


def test_a_closed_connection_is_used_again_and_an_open_transaction_never(tmp_path):
    idle = _Idle(size=2)
    path = str(tmp_path / "db.sqlite3")
    first = sqlite3.connect(path, isolation_level=None)
    first.execute("CREATE TABLE t (x)")
    assert idle.give(path, first)
    assert idle.take(path) is first and idle.take(path) is None

    first.execute("BEGIN")  # a connection closed mid-transaction is closed for real
    assert not idle.give(path, first)
    first.execute("ROLLBACK")
    others = [sqlite3.connect(path) for _ in range(3)]
    assert [idle.give(path, c) for c in others] == [True, True, False]  # at most `size` kept
    assert idle.take(str(tmp_path / "other.sqlite3")) is None  # per file


def test_a_connection_to_a_replaced_file_is_not_handed_out(tmp_path):
    idle = _Idle()
    path = tmp_path / "db.sqlite3"
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("CREATE TABLE t (x)")
    assert idle.give(str(path), old)
    path.unlink()  # a test database deleted and made again
    sqlite3.connect(path).close()
    assert idle.take(str(path)) is None


@pytest.mark.django_db(transaction=True)
def test_djangos_connection_comes_back_from_the_idle_ones():
    connection.ensure_connection()
    raw = connection.connection
    connection.close()
    connection.ensure_connection()
    assert connection.connection is raw
    with connection.cursor() as cursor:  # and it works as a fresh one would
        cursor.execute("PRAGMA foreign_keys")
        assert cursor.fetchone() == (1,)
