"""The GPU and CPU Celery workers as subprocesses, started exactly as
`make run` starts them (chat/management/commands/runstack.py), against the
test database. The `workers` fixture (tests/conftest.py) holds one set for
the whole run; bench/batch_throughput.py uses `Workers` too."""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from urllib.parse import quote

from chatsite.celery import app
from tests.support import ROOT
from tests.support.waiting import wait_for

#: Seconds for a worker to import torch and Django and answer a ping on a
#: loaded 2-core machine.
WORKER_READY_TIMEOUT = 90.0


class Workers:
    """The GPU worker and a CPU worker, against the test database."""

    def __init__(self, var: Path, database_url: str):
        self.var = var
        self.database_url = database_url
        self.procs: dict[str, subprocess.Popen] = {}

    def argv(self, name: str) -> list[str]:
        """`gpu`, `cpu` and `knowledge` as `make run` starts them; `gpu1` is
        a second GPU worker (slot 1), as docker-compose.yml starts one per
        extra GPU."""
        from chat.management.commands.runstack import stack_commands

        kind = "gpu" if name.startswith("gpu") else name
        for proc_name, argv in stack_commands(host="127.0.0.1", port=0):
            if proc_name == f"{kind}-worker":
                argv = [a.replace("@%h", "@test").replace("gpu@", f"{name}@") for a in argv]
                return [f"gpu.{self.slot(name)}" if a.startswith("gpu.") else a for a in argv]
        raise KeyError(name)

    @staticmethod
    def slot(name: str) -> str:
        return name.removeprefix("gpu") or "0"

    def start(self, name: str) -> None:
        env = {**os.environ, "DATABASE_URL": self.database_url, "PYTHONUNBUFFERED": "1"}
        if name.startswith("gpu"):
            env["GPU_SLOT"] = self.slot(name)
        with open(self.var / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(self.argv(name), cwd=ROOT, env=env, stdout=log,
                                                stderr=subprocess.STDOUT)
        node = f"{name}@test"

        def answered() -> bool:
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} worker exited:\n{self.log(name)}")
            return any(node in reply for reply in app.control.ping(destination=[node], timeout=0.5))

        wait_for(answered, timeout=WORKER_READY_TIMEOUT, interval=0.2, what=f"{name} worker")

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @contextlib.contextmanager
    def restarted_with(self, names: tuple[str, ...], **env: str):
        """Restart `names` with `env` set for the block, and as before after it."""
        before = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        self._restart(names)
        try:
            yield
        finally:
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key)
                else:
                    os.environ[key] = value
            self._restart(names)

    def _restart(self, names: tuple[str, ...]) -> None:
        for name in names:
            self.stop(name)
            self.start(name)

    def kill(self, name: str) -> None:
        """SIGKILL: the worker gets no chance to clean up, as in a crash."""
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()

    def log(self, name: str) -> str:
        path = self.var / f"{name}.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""


def test_database_url(db: dict) -> str:
    """The URL of the test database pytest-django created (its
    `connection.settings_dict`), for the subprocesses."""
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    scheme = {"postgresql": "postgres", "mysql": "mysql"}[db["ENGINE"].rsplit(".", 1)[-1]]
    auth = f"{quote(db['USER'])}:{quote(db['PASSWORD'])}@" if db.get("USER") else ""
    return f"{scheme}://{auth}{db.get('HOST') or 'localhost'}:{db.get('PORT') or ''}/{db['NAME']}"


# Not a test, though its name starts with "test_" (a module that imports it
# would otherwise have pytest collect it).
test_database_url.__test__ = False
