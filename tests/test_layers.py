"""Torch only where the GPU is (docs/architecture.md): the web process and the
CPU workers never import torch or transformers. Checked in a fresh
interpreter, as each process starts, through `sys.modules` (the import
contracts in .importlinter check the same statically)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import ROOT

HEAVY = ("torch", "transformers", "accelerate")

PROBES = {
    # What uvicorn loads, then what a CPU worker loads: the Celery app and
    # its CELERY_IMPORTS, as the worker imports them.
    "web and cpu worker": ("import chatsite.asgi, chatsite.urls\n"
                           "from chatsite.celery import app\n"
                           "app.loader.import_default_modules()\n"
                           "assert 'workers.tasks.cpu_generate' in app.tasks"),
    "gpu worker": "from chatsite.celery import app\nimport workers.gpu_tasks",
}


def _started(code: str) -> subprocess.Popen:
    probe = (
        "import json, sys, django\n"
        "django.setup()\n"
        f"{code}\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "chatsite.settings"}
    return subprocess.Popen([sys.executable, "-c", probe], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _loaded(proc: subprocess.Popen) -> list[str]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


#: The probes' interpreters, once started (by `start_early`, or by the fixture).
_procs: dict[str, subprocess.Popen] = {}


def start_early(config) -> None:
    """Start the probes as soon as the run knows that a test of this module
    was selected (tests/conftest.py calls this when collection ends): each
    interpreter spends seconds importing, on the core the tests leave idle."""
    if not _procs:
        _procs.update({name: _started(code) for name, code in PROBES.items()})
        config.add_cleanup(_stop)


def _stop() -> None:
    for proc in _procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def loaded_after(request) -> dict[str, list[str]]:
    """What each probe's interpreter loaded."""
    start_early(request.config)
    return {name: _loaded(proc) for name, proc in _procs.items()}


def test_the_web_process_and_a_cpu_worker_never_import_torch(loaded_after):
    assert loaded_after["web and cpu worker"] == []


def test_a_gpu_worker_imports_them_with_its_tasks(loaded_after):
    # The probe above would pass on a machine without torch too; this shows it can see them.
    assert {"torch", "transformers"} <= set(loaded_after["gpu worker"])
