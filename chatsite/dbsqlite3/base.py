"""Django's SQLite backend, waiting for the write lock without blocking
the process.

SQLite lets one connection write at a time; a second waits in SQLite's own
busy handler, which sleeps in C. In the CPU worker's gevent pool every
stream is a greenlet of one thread: a greenlet waiting there stops the
whole process, including the greenlet that holds the lock and would release
it (it yielded on a socket inside a transaction: a Redis call in a
batch line's dispatch). The process then stands still for the whole
timeout and the writes fail with "database is locked".

So SQLite's own wait is kept to a few milliseconds (BUSY_SLICE) and the
rest of the wait (the `timeout` option, 30 s in chatsite/settings.py) is
spent here, in time.sleep, which gevent turns into a yield: the lock holder
runs, commits, and the waiter's retry goes through. A statement that failed
with SQLITE_BUSY did nothing, so running it again is safe; in WAL mode with
IMMEDIATE transactions (settings), only the statement that takes the write
lock (BEGIN IMMEDIATE, or an autocommit write), the commit, and the
pragmas a new connection runs can fail so.

Connections are also kept open between uses, per process (`_Idle`):
Django closes its connection after every request and task (CONN_MAX_AGE
0), and in the CPU worker every task is a new greenlet with a connection
of its own; opening one (the file, the functions Django registers, the
pragmas) was 5 % of the web process's and the CPU worker's time
(docs/BENCHMARKS.md, "The message path").
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time

from django.db.backends.sqlite3 import base

#: Seconds SQLite's own busy handler may block before we take over. 0 (no
#: stall of the process at all) measured slower: 123 against 142 messages/s
#: at 10 sockets, the retries' polling costing more than the short stalls.
BUSY_SLICE = 0.005
#: Our pause between tries: doubled from the first to the last.
PAUSE_FIRST, PAUSE_LAST = 0.0005, 0.005


def _busy(exc: Exception) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "database is locked" in str(exc)


def _retried(call, timeout: float):
    deadline = time.monotonic() + timeout
    pause = PAUSE_FIRST
    while True:
        try:
            return call()
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, PAUSE_LAST)


class _Idle:
    """Open SQLite connections not in use, per database file, at most
    `size` of each. A connection comes back only outside a transaction,
    and goes out again only to the same file (the same inode: a test
    database deleted and made again is a new file)."""

    def __init__(self, size: int = 64):
        self.size = size
        self._lock = threading.Lock()
        self._free: dict[str, list[tuple[tuple[int, int], sqlite3.Connection]]] = {}

    @staticmethod
    def _identity(path: str) -> tuple[int, int] | None:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return stat.st_dev, stat.st_ino

    def take(self, path: str) -> sqlite3.Connection | None:
        identity = self._identity(path)
        with self._lock:
            free = self._free.get(path, [])
            while free:
                seen, conn = free.pop()
                if seen == identity:
                    return conn
                conn.close()  # the file was replaced: that connection reads the old one
        return None

    def give(self, path: str, conn: sqlite3.Connection) -> bool:
        """Keep `conn` for the next use; False (the caller closes it) when it
        is in a transaction, or enough are kept."""
        identity = self._identity(path)
        if conn.in_transaction or identity is None:
            return False
        with self._lock:
            free = self._free.setdefault(path, [])
            if len(free) >= self.size:
                return False
            free.append((identity, conn))
        return True


_idle = _Idle()


class CursorWrapper(base.SQLiteCursorWrapper):
    busy_timeout = 30.0

    def execute(self, query, params=None):
        return _retried(lambda: super(CursorWrapper, self).execute(query, params), self.busy_timeout)

    def executemany(self, query, param_list):
        param_list = list(param_list)  # a generator could not be replayed
        return _retried(lambda: super(CursorWrapper, self).executemany(query, param_list), self.busy_timeout)


class DatabaseWrapper(base.DatabaseWrapper):
    def get_connection_params(self):
        params = super().get_connection_params()
        self._busy_timeout = float(params.get("timeout", 5.0))
        params["timeout"] = BUSY_SLICE
        return params

    def _pooled(self) -> bool:
        return not self.is_in_memory_db()

    def get_new_connection(self, conn_params):
        if self._pooled():
            conn = _idle.take(self.settings_dict["NAME"])
            if conn is not None:
                return conn
        # Opening runs the init pragmas (journal_mode=WAL), which need the
        # lock for a moment too.
        return _retried(lambda: super(DatabaseWrapper, self).get_new_connection(conn_params),
                        self._busy_timeout)

    def _close(self):
        if (self.connection is not None and self._pooled() and not self.in_atomic_block
                and _idle.give(self.settings_dict["NAME"], self.connection)):
            return
        super()._close()

    def create_cursor(self, name=None):
        cursor = self.connection.cursor(factory=CursorWrapper)
        cursor.busy_timeout = self._busy_timeout
        return cursor

    def _commit(self):
        if self.connection is not None:
            with self.wrap_database_errors:
                return _retried(self.connection.commit, self._busy_timeout)
