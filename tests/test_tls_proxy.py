"""Issue 17: TLS as the deployment serves it. deploy/Caddyfile, the very
file docker-compose mounts, run by a real Caddy (Debian's, `make
caddy-tool`) on loopback ports, in front of a web process started with
the compose web service's environment (tests/support/compose.py): Caddy's
local CA, the HTTP to HTTPS redirect, Django trusting the proxy's scheme
(no redirect loop, secure cookies), and a logged-in websocket through the
proxy."""
import asyncio
import json
import os
import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.support import ROOT
from tests.support.compose import service_environment
from tests.support.net import free_port
from tests.support.waiting import wait_for
from tests.support.web import WebServer

pytestmark = pytest.mark.django_db(transaction=True)

CADDY = ROOT / "var/tools/caddy/usr/bin/caddy"
SECRET = "tls-test-" + "k" * 50


def caddy_binary() -> str:
    found = shutil.which("caddy") or (str(CADDY) if CADDY.exists() else None)
    if not found:
        pytest.skip("caddy is missing: `make test` fetches Debian's (make caddy-tool)")
    return found


@pytest.fixture
def proxied(stack, tmp_path, django_db_setup):
    """(the HTTPS URL, the HTTP URL, the web process's own URL, Caddy's root
    certificate): the compose layout, on loopback."""
    from django.db import connection

    from tests.support.workers import test_database_url

    https_port, http_port = free_port(), free_port()
    origin = f"https://localhost:{https_port}"
    compose = service_environment("web", variables={"DJANGO_SECRET_KEY": SECRET, "CHAT_HOST": "localhost"})
    for outside in ("REDIS_URL", "DATABASE_URL", "OLLAMA_BASE_URL"):  # the compose network's hosts
        compose.pop(outside)
    # On a port other than 443 the site's origin carries the port.
    web = WebServer(log_dir=stack.var, database_url=test_database_url(connection.settings_dict),
                    env={**compose, "DJANGO_CSRF_TRUSTED_ORIGINS": origin})
    web.start()
    data = tmp_path / "caddy"
    env = {**os.environ, "XDG_DATA_HOME": str(data), "XDG_CONFIG_HOME": str(tmp_path / "caddy-config"),
           "CHAT_HOST": f"localhost:{https_port}", "CHAT_TLS": "internal", "CADDY_ADMIN": "off",
           "CADDY_HTTP_PORT": str(http_port), "CHAT_UPSTREAM": f"127.0.0.1:{web.port}"}
    log = open(tmp_path / "caddy.log", "wb")
    caddy = subprocess.Popen([caddy_binary(), "run", "--config", str(ROOT / "deploy/Caddyfile"),
                              "--adapter", "caddyfile"], env=env, stdout=log, stderr=subprocess.STDOUT)
    root = data / "caddy/pki/authorities/local/root.crt"

    def serving() -> bool:
        if caddy.poll() is not None:
            raise AssertionError((tmp_path / "caddy.log").read_text()[-3000:])
        if not root.exists():
            return False
        try:
            return httpx.get(f"{origin}/healthz", verify=ssl.create_default_context(cafile=root),
                             timeout=2).status_code == 200
        except (httpx.TransportError, ssl.SSLError):
            return False

    try:
        wait_for(serving, timeout=30, what="caddy serving HTTPS with its local CA")
        yield origin, f"http://localhost:{http_port}", web.url, root
    finally:
        caddy.terminate()
        caddy.wait(timeout=10)
        log.close()
        web.stop()


def test_caddy_terminates_tls_and_django_trusts_its_scheme(proxied, user):
    origin, plain, direct, root = proxied
    trusted = ssl.create_default_context(cafile=root)
    with httpx.Client(verify=trusted, timeout=10) as client:
        # Plain HTTP at the proxy is sent to HTTPS.
        redirect = client.get(f"{plain}/accounts/login/")
        assert redirect.status_code in (301, 308) and redirect.headers["location"].startswith("https://")
        # Through the proxy, Django sees HTTPS (X-Forwarded-Proto): the page,
        # not a redirect to itself, with HSTS, the CSP and a secure CSRF cookie.
        page = client.get(f"{origin}/accounts/login/")
        assert page.status_code == 200
        assert page.headers["strict-transport-security"].startswith("max-age=")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "secure" in page.headers["set-cookie"].lower()
        # Logging in through the proxy gives a secure session cookie.
        login = client.post(f"{origin}/accounts/login/", data={
            "username": "alice", "password": "pw-alice-123", "csrfmiddlewaretoken": client.cookies["csrftoken"]},
            headers={"Origin": origin, "Referer": f"{origin}/accounts/login/"})
        assert login.status_code == 302, login.text[:500]
        assert "secure" in login.headers["set-cookie"].lower() and "sessionid" in client.cookies
        session = client.cookies["sessionid"]
    # Straight to the web process, plain HTTP is refused with a redirect to HTTPS.
    assert httpx.get(f"{direct}/accounts/login/").status_code == 301

    async def chat_over_wss() -> dict:
        socket_url = origin.replace("https://", "wss://") + "/ws/chat/"
        async with connect(socket_url, ssl=trusted, additional_headers={
                "Cookie": f"sessionid={session}", "Origin": origin}) as socket:
            await socket.send("not json")
            return json.loads(await asyncio.wait_for(socket.recv(), timeout=10))

    frame = asyncio.run(chat_over_wss())
    assert frame["type"] == "chat.error"  # the consumer answered, over TLS, through the proxy


def test_the_deployments_caddyfile_is_valid_for_a_lan_host_and_for_lets_encrypt(tmp_path):
    for tls in ("internal", "ops@example.com"):
        env = {**os.environ, "CHAT_HOST": "chat.lan", "CHAT_TLS": tls, "XDG_DATA_HOME": str(tmp_path)}
        done = subprocess.run([caddy_binary(), "validate", "--config", str(ROOT / "deploy/Caddyfile"),
                               "--adapter", "caddyfile"], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
