"""Torch only where the GPU is (docs/architecture.md): the web process and the
CPU workers never import torch or transformers. Checked in a fresh
interpreter, as each process starts, through `sys.modules` (the import
contracts in .importlinter check the same statically)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support import ROOT

HEAVY = ("torch", "transformers", "accelerate")


def _loaded_after(code: str) -> list[str]:
    probe = (
        "import json, sys, django\n"
        "django.setup()\n"
        f"{code}\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "chatsite.settings"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_web_process_and_a_cpu_worker_never_import_torch():
    # What uvicorn loads, then what a CPU worker loads: the Celery app and
    # its CELERY_IMPORTS, as the worker imports them.
    code = ("import chatsite.asgi, chatsite.urls\n"
            "from chatsite.celery import app\n"
            "app.loader.import_default_modules()\n"
            "assert 'workers.tasks.cpu_generate' in app.tasks")
    assert _loaded_after(code) == []


def test_a_gpu_worker_imports_them_with_its_tasks():
    # The probe above would pass on a machine without torch too; this shows it can see them.
    code = "from chatsite.celery import app\nimport workers.gpu_tasks"
    assert {"torch", "transformers"} <= set(_loaded_after(code))
