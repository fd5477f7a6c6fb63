"""docker-compose.yml is valid and every command in it names a real module
and entry point of this project (no Docker engine runs here, so this is as
far as the file can be checked)."""
import importlib
import os
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.core.management import get_commands

from tests.support.compose import service_environment

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"


def compose_commands() -> dict[str, list[str]]:
    """Commands of the services built from this project (redis, postgres and
    ollama run their own images)."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    return {name: svc["command"] for name, svc in services.items() if "build" in svc and "command" in svc}


def python_invocations(argv: list[str]) -> list[list[str]]:
    """The `python ...` command lines inside a service command, unwrapping
    `sh -c "a && b"`."""
    if argv[:2] == ["sh", "-c"]:
        return [shlex.split(part) for part in argv[2].split("&&")]
    return [argv]


def check_python(argv: list[str]) -> None:
    assert argv[0] == "python", argv
    if argv[1] == "manage.py":
        assert (ROOT / "manage.py").exists()
        assert argv[2] in get_commands(), f"no management command {argv[2]!r}"
        return
    assert argv[1] == "-m", argv
    module = argv[2]
    assert importlib.util.find_spec(module), f"no module {module!r}"
    if module == "uvicorn":
        target_module, attr = argv[3].split(":")
        assert callable(getattr(importlib.import_module(target_module), attr))
    elif module == "celery":
        app_module = argv[argv.index("-A") + 1]
        assert importlib.import_module(app_module).celery_app.main == "chatsite"
        queues = argv[argv.index("-Q") + 1].split(",")
        # gpu.<slot> (one per GPU, chat/placement.py) or a routed queue.
        routed = {route["queue"] for route in settings.CELERY_TASK_ROUTES.values()}
        for queue in queues:
            assert queue in routed | {settings.CELERY_TASK_DEFAULT_QUEUE} or (
                queue.startswith("gpu.") and queue.removeprefix("gpu.").isdigit()), queue


def test_every_compose_command_names_a_real_entry_point():
    commands = compose_commands()
    assert {"web", "gpu-worker", "cpu-worker", "knowledge-worker"} <= set(commands)
    for argv in commands.values():
        for invocation in python_invocations(argv):
            check_python(invocation)


def test_compose_worker_lines_match_make_run():
    """The workers run exactly as `make run` runs them (the options are
    explained in chatsite/celery.py)."""
    from chat.management.commands.runstack import stack_commands

    ours = {name: argv[2:] for name, argv in stack_commands(host="h", port=1)}
    commands = compose_commands()
    for service in ("gpu-worker", "cpu-worker", "knowledge-worker"):
        compose = [a for a in commands[service][2:] if not a.startswith("--loglevel")]
        local = [a for a in ours[service] if a not in ("--loglevel", "INFO")]
        assert compose == local, (service, compose, local)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_docker_compose_config_validates():
    # The web service needs a secret key of the deployer's own (compose stops without one).
    env = {**os.environ, "DJANGO_SECRET_KEY": "a-deployers-own-secret"}
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True,
                            text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr


def test_make_run_starts_the_cpu_worker_processes_as_distinct_nodes_and_restarts_each():
    from chat.management.commands.runstack import _restart_allowed, stack_commands

    commands = dict(stack_commands(host="h", port=1, cpu_workers=3))
    cpu = {name: argv for name, argv in commands.items() if name.startswith("cpu-worker")}
    assert list(cpu) == ["cpu-worker", "cpu-worker-2", "cpu-worker-3"]
    assert [argv[argv.index("-n") + 1] for argv in cpu.values()] == ["cpu@%h", "cpu2@%h", "cpu3@%h"]
    assert all(argv[argv.index("-Q") + 1] == "cpu" for argv in cpu.values())
    restarts: dict = {}
    assert _restart_allowed("cpu-worker-3", restarts) and _restart_allowed("gpu-worker", restarts)
    assert not _restart_allowed("web", restarts)


# --- the production posture (issue 17) ------------------------------------------

#: A deployer's own key: long and random enough for the deploy check (W009).
DEPLOY_KEY = secrets.token_urlsafe(50)


def test_check_deploy_passes_with_the_compose_web_environment(tmp_path):
    """`manage.py check --deploy`, with exactly the environment compose gives
    the web service (plus the secret key compose demands), reports nothing:
    HSTS, the HTTPS redirect, secure cookies and the rest are on."""
    environment = service_environment("web", variables={"DJANGO_SECRET_KEY": DEPLOY_KEY})
    # Nothing from this test run's own environment leaks in but the basics.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CHAT_VAR_DIR": str(tmp_path), **environment}
    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout, result.stdout


def test_the_development_settings_stay_plain_http():
    """`make run` serves http://127.0.0.1: no redirect, no secure-only cookie, no HSTS."""
    assert not settings.SECURE_SSL_REDIRECT and not settings.SESSION_COOKIE_SECURE
    assert not settings.CSRF_COOKIE_SECURE and settings.SECURE_HSTS_SECONDS == 0


def test_only_the_proxy_is_published_and_it_passes_to_the_web_service():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    published = {name for name, svc in services.items() if svc.get("ports")}
    assert published == {"caddy"}, published
    assert services["caddy"]["image"].startswith("caddy:2.")  # a pinned minor version
    caddyfile = (ROOT / "deploy" / "Caddyfile").read_text()
    assert "reverse_proxy {$CHAT_UPSTREAM:web:8000}" in caddyfile  # web:8000 unless a test says otherwise
    assert "./deploy/Caddyfile:/etc/caddy/Caddyfile:ro" in services["caddy"]["volumes"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_the_environment_read_here_is_what_docker_compose_resolves(tmp_path):
    """tests/support/compose.py reads variables as compose does."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DJANGO_SECRET_KEY": DEPLOY_KEY}
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]["web"]["environment"]
    if isinstance(resolved, list):
        resolved = dict(item.split("=", 1) for item in resolved)
    assert {k: str(v) for k, v in resolved.items()} == service_environment(
        "web", variables={"DJANGO_SECRET_KEY": DEPLOY_KEY})
