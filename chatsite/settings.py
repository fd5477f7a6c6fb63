"""Settings, all from the environment (CONTRACT §2); a `.env` file in the
project root is read too, without overriding variables already set."""
import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from dotenv import load_dotenv
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from chatsite import queues

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("CHAT_VAR_DIR", BASE_DIR / "var"))
load_dotenv(BASE_DIR / ".env", override=False)


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def private_redis_url() -> str:
    """`make run` starts a private Redis and writes its port to var/redis.port,
    so that `manage.py` commands in the same checkout find it with no setting."""
    port_file = VAR_DIR / "redis.port"
    if port_file.exists():
        return f"redis://127.0.0.1:{port_file.read_text().strip()}/0"
    return "redis://127.0.0.1:6379/0"


# --- Django -----------------------------------------------------------------

DEV_SECRET_KEY = "dev-only-insecure-key-change-me-in-production"
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", DEV_SECRET_KEY)
DEBUG = env_bool("DJANGO_DEBUG", True)
if not DEBUG and SECRET_KEY == DEV_SECRET_KEY:
    # Sessions and CSRF tokens signed with a key printed in this file can be forged.
    raise ImproperlyConfigured("DJANGO_DEBUG is off: set DJANGO_SECRET_KEY to a secret of your own.")
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    # Login throttling (issue 17): its failure records and lockouts, shown
    # and cleared in the admin ("Access attempts").
    "axes",
    "chat",
    "gpu_manager",
    "workers",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # The Content-Security-Policy header on every response, static files
    # included (WhiteNoise answers them from the next middleware).
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    # After sessions, before common (Django's i18n docs): the language comes
    # from the language cookie that /i18n/setlang/ sets, else the browser's
    # Accept-Language.
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last (django-axes' docs): it turns a login refused for a lockout into
    # the lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "chatsite.urls"
ASGI_APPLICATION = "chatsite.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

VAR_DIR.mkdir(parents=True, exist_ok=True)
DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}", conn_max_age=0
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web process and two workers write the same file: WAL lets readers
    # run beside a writer, IMMEDIATE takes the write lock at BEGIN (no
    # upgrade deadlocks), and the timeout waits for a lock instead of failing
    # with "database is locked" (Django 5.1+ SQLite notes).
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
    # Django's backend, waiting for the write lock with sleeps that gevent
    # can run other greenlets through (chatsite/dbsqlite3/base.py).
    DATABASES["default"]["ENGINE"] = "chatsite.dbsqlite3"
    # Workers are separate processes: the test database must be a file.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-db.sqlite3")}
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # A pool per process (psycopg_pool, Django 5.1+): the CPU worker's
    # streams give their connection back between writes
    # (workers/replies.py), so hundreds of streams share a few connections
    # instead of opening one each (PostgreSQL allows 100 by default).
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1, "max_size": int(os.environ.get("DATABASE_POOL_MAX", 16)), "timeout": 30}
    # With the pool, Django checks a connection as the pool hands it out
    # (psycopg_pool's check_connection): after a database restart the pool
    # still holds connections the server ended, and would hand one to the
    # next tick or request (tests/test_lifecycle.py).
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
# django-axes' backend first: it refuses a locked-out login before the
# password is even checked, so a guess during the cool-down tells nothing.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

# --- Production posture (issue 17; docs/security.md) --------------------------
# Every value here is dev-safe by default (`make run` serves plain HTTP on
# loopback) and turned on by the environment docker-compose.yml gives the
# web service, behind Caddy, which terminates TLS (deploy/Caddyfile).

#: Caddy tells Django the request came over HTTPS with X-Forwarded-Proto.
#: Only trustworthy when nothing but the proxy reaches the web process
#: (compose publishes Caddy's ports, not the web's); otherwise a client
#: could claim HTTPS itself.
if env_bool("DJANGO_SECURE_PROXY_SSL_HEADER", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", False)
#: Probes reach the web process directly over plain HTTP inside the compose
#: network (the healthcheck, a Prometheus scrape): never redirected, or
#: they would follow the redirect to an https port nobody serves.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SESSION_COOKIE_SECURE = env_bool("DJANGO_SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = env_bool("DJANGO_CSRF_COOKIE_SECURE", False)
#: HSTS: 0 (off) in development. Compose sets one hour: a browser that saw
#: it refuses plain HTTP for an hour, so a certificate mistake locks users
#: out for an hour at most. Raise it to a year (31536000) once HTTPS is
#: known to work (Django's deployment checklist: "set it to a small value
#: and increase it"; cookiecutter-django does the same).
SECURE_HSTS_SECONDS = int(os.environ.get("DJANGO_SECURE_HSTS_SECONDS", 0))
#: The site is served on a host name of its own, so its subdomains are its
#: own too. Preload is only a consent in the header: hstspreload.org also
#: asks for max-age of a year, so nothing is preloaded until a deployer
#: raises DJANGO_SECURE_HSTS_SECONDS and submits the domain.
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", False)
#: Origins allowed to POST besides the site's own (Django compares the
#: Origin with the Host, which Caddy passes on unchanged, so the site's own
#: https:// origin needs no entry; compose lists it anyway, for a proxy
#: that rewrites the Host).
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")
# Django's defaults, written down because the deploy check and the tests
# rely on them: nosniff, DENY framing (also `frame-ancestors` below), and
# no Referer to other sites.
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SECURE_REFERRER_POLICY = "same-origin"

#: The page's Content-Security-Policy (django-csp; Django 6 has the same
#: settings built in). Scripts and styles only from this origin, no inline
#: script or style, no eval: model output that escaped markdown.js's text
#: nodes would still run nothing. `connect-src 'self'` covers the websocket:
#: CSP 3 matches ws: and wss: to the page's own http: and https: origin
#: (checked in Chromium by the browser tests). The admin needs nothing more:
#: Django 5.2's admin templates have no inline script or style attribute.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'"],
        "connect-src": ["'self'"],
        "font-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    },
}

#: Password guessing (django-axes): after LOGIN_FAILURE_LIMIT wrong
#: passwords for one account (from anywhere), or from one address (for any
#: account), logins for it are refused for LOGIN_COOLOFF_SECONDS, the right
#: password included. Five tries and 15 minutes: a person who mistypes gets
#: several chances, a guesser gets 480 a day per account instead of
#: thousands a second (NIST SP 800-63B 5.2.2 asks for at most 100
#: consecutive failures; OWASP's Authentication Cheat Sheet suggests a
#: lockout of this shape with a cool-down rather than a permanent lock).
LOGIN_FAILURE_LIMIT = int(os.environ.get("LOGIN_FAILURE_LIMIT", 5))
LOGIN_COOLOFF_SECONDS = float(os.environ.get("LOGIN_COOLOFF_SECONDS", 15 * 60))
AXES_FAILURE_LIMIT = LOGIN_FAILURE_LIMIT
AXES_COOLOFF_TIME = timedelta(seconds=LOGIN_COOLOFF_SECONDS)
#: Two separate lockouts: per account and per address.
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
#: The cool-down runs from the failure that locked, not from the last try:
#: tries during a lockout are refused without checking the password, so
#: extending it would only keep the account's owner out longer.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
#: The client's address is REMOTE_ADDR: uvicorn sets it from
#: X-Forwarded-For only for a proxy it trusts (FORWARDED_ALLOW_IPS; compose
#: trusts the proxy, `make run` only loopback), so a client cannot pick its
#: own address with a header.
AXES_IPWARE_META_PRECEDENCE_ORDER = ("REMOTE_ADDR",)
#: Not verbose: no banner from every process at start. A failure's log
#: line names the account and the address (axes masks both by default,
#: which leaves an operator nothing to act on); a password is always masked.
AXES_VERBOSE = False
AXES_SENSITIVE_PARAMETERS: list[str] = []

#: Wrong Bearer keys (chat/api/key_throttle.py): past API_KEY_FAILURE_LIMIT
#: unknown keys from one address, or with one key prefix, within
#: API_KEY_COOLOFF_SECONDS, /v1 refuses that address or prefix (any key,
#: the right one too) with 429 until the cool-down ends. A key is 256
#: random bits, so the limit does not protect the key space; it makes a
#: scan cost the scanner, not one database lookup and one log line per
#: try. Higher than the login's: scripts, not people, send keys, and a
#: broken script retrying must not shut out its neighbours at once.
API_KEY_FAILURE_LIMIT = int(os.environ.get("API_KEY_FAILURE_LIMIT", 20))
API_KEY_COOLOFF_SECONDS = float(os.environ.get("API_KEY_COOLOFF_SECONDS", 15 * 60))

LANGUAGE_CODE = "en-us"
#: The chat page's languages (issue 4): the first users write Chinese.
#: Browsers send zh-CN / zh-SG / zh; Django falls back from each to zh-hans.
LANGUAGES = [("en", "English"), ("zh-hans", "简体中文")]
LOCALE_PATHS = [BASE_DIR / "chat" / "locale"]
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
# WhiteNoise serves static files from the ASGI server itself: GPU boxes are
# often offline and have no separate web server in front.
WHITENOISE_USE_FINDERS = True

# --- Redis: broker, results, channel layer, cache, GPU state -----------------

REDIS_URL = os.environ.get("REDIS_URL") or private_redis_url()

#: Connections of each Redis pool of the project's (chatsite/redis_client.py)
#: and of the cache; a command that finds all in use waits up to
#: REDIS_POOL_TIMEOUT seconds for one (redis-py's default pool would fail
#: with "Too many connections" past 100: the CPU worker's greenlets).
REDIS_POOL_MAX = int(os.environ.get("REDIS_POOL_MAX", 100))
REDIS_POOL_TIMEOUT = float(os.environ.get("REDIS_POOL_TIMEOUT", 20.0))
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "cache",
        "OPTIONS": {"pool_class": "redis.BlockingConnectionPool", "max_connections": REDIS_POOL_MAX,
                    "timeout": REDIS_POOL_TIMEOUT},
    }
}

CHANNEL_LAYERS = {
    "default": {
        # channels_redis's layer, with a receive() that a disconnect always
        # ends on Python 3.11 (chatsite/channel_layer.py).
        "BACKEND": "chatsite.channel_layer.RedisChannelLayer",
        "CONFIG": {
            # channels_redis passes each host dict, less "address", to
            # redis.asyncio.ConnectionPool.from_url, hence to every connection.
            "hosts": [{
                "address": REDIS_URL,
                # redis-py 8 gives every connection a 5 s socket timeout, and
                # channels_redis blocks in BZPOPMIN for exactly 5 s: an idle
                # socket's receive loop then dies with "Timeout reading". A
                # read timeout well above the blocking pop keeps idle sockets
                # alive while a dead Redis is still noticed.
                "socket_timeout": 30,
                # redis-py's asyncio pool fails past its cap (100 by
                # default) instead of waiting; a web process with hundreds
                # of sockets can have that many commands in flight.
                "max_connections": 1000,
                # After a Redis restart the pool still holds connections the
                # old server closed, and hands them out unchecked: the first
                # command on each fails with "Connection closed by server"
                # (tests/test_faults.py
                # test_redis_restart_first_message_after_it_is_accepted).
                # Retried once, at once, on a fresh connection: a Redis that
                # is back answers it; one that is still down fails it as
                # before. Connection errors only: a timeout is not retried,
                # so a hung Redis is noticed in one socket_timeout, not two.
                "retry": AsyncRetry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            }],
            # group_send drops silently when a channel holds `capacity`
            # messages (channels_redis spec; #131). The sockets of one web
            # process share one Redis key (channels_redis's process-specific
            # channels), so the capacity is that whole process's backlog:
            # 500 streams at CHAT_FRAMES_PER_SECOND is 2,000 frames a second
            # into it, and 20,000 is 10 s of backlog (a few MB at most).
            "capacity": 20000,
            "expiry": 60,
        },
    }
}

# --- Celery (CELERY_ namespace, see chatsite/celery.py) ----------------------
# https://docs.celeryq.dev/en/stable/userguide/configuration.html

CELERY_BROKER_URL = REDIS_URL
# No result backend: replies travel through the channel layer and nothing
# reads a task's result. With one, every send also SUBSCRIBEs (and later
# UNSUBSCRIBEs) to the task's result channel: two Redis commands per message
# for nothing (docs/BENCHMARKS.md, "Redis commands per message").
# The (disabled) result backend is one per process, not one per thread:
# under the CPU worker's gevent pool, one per greenlet was one per task.
CELERY_RESULT_BACKEND_THREAD_SAFE = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# Everything that only talks HTTP to Ollama or an OpenAI endpoint runs on the
# CPU workers. GPU work is queued per GPU, on `gpu.<slot>`, consumed by that
# GPU's one worker: the sender names the queue (chat/dispatch.py); this
# route only catches a GPU task sent without one (the admin's load/unload).
# Names and queues: chatsite/queues.py.
CELERY_TASK_ROUTES = {
    "workers.tasks.gpu_*": {"queue": queues.gpu_queue(os.environ.get("GPU_SLOT", "0"))},
    "workers.tasks.cpu_*": {"queue": queues.CPU_QUEUE},
    "workers.knowledge_tasks.*": {"queue": queues.KNOWLEDGE_QUEUE},
}
CELERY_TASK_DEFAULT_QUEUE = queues.CPU_QUEUE
# Every worker loads the CPU tasks; the GPU worker adds the GPU ones with
# `-I workers.gpu_tasks`, so that no other process imports torch.
CELERY_IMPORTS = (queues.CPU_TASK_MODULE,)
# Acknowledge after the task ran, so a message is not lost when a worker dies
# mid-task; one message reserved at a time, so the GPU worker never holds a
# second request that the solo pool could not start anyway (Celery
# "Prefetch limits": https://docs.celeryq.dev/en/stable/userguide/optimizing.html#prefetch-limits).
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Generation limits. The solo pool (GPU worker) drops these
# (celery/concurrency/solo.py); the gevent pool (CPU workers) enforces the
# hard one, and the reply then ends with `time_limit` (workers/base.py;
# tests/test_faults.py
# test_the_solo_pool_ignores_task_time_limits_and_the_gevent_pool_ends_the_reply_at_them).
# They are the budget the redelivery timeout below is sized from; what
# bounds a generation in fact is max_new_tokens, UPSTREAM_READ_TIMEOUT and
# GENERATION_DEADLINE_SECONDS (docs/reliability.md).
CHAT_TASK_SOFT_TIME_LIMIT = int(os.environ.get("CHAT_TASK_SOFT_TIME_LIMIT", 600))
CELERY_TASK_SOFT_TIME_LIMIT = CHAT_TASK_SOFT_TIME_LIMIT
CELERY_TASK_TIME_LIMIT = CHAT_TASK_SOFT_TIME_LIMIT + 60
#: Since the GPU worker's pool enforces no limit above, generation enforces its own:
#: seconds from when a run claims a reply (chat/dispatch.py reply_claim;
#: for a local model, before its GPU switch) after which the local model
#: stops at its next token and an Ollama or OpenAI stream is closed at its
#: next chunk. The reply keeps what was written and ends as a cut-off
#: reply, `chat.done` with finish_reason "length" (what a token limit
#: gives, and what an OpenAI client expects of a reply cut short), not as
#: an error. Four fifths of the soft limit: what is left (120 s by default)
#: covers a stalled upstream's last read (UPSTREAM_READ_TIMEOUT), so a run
#: ends before the soft limit and far before the redelivery timeout below
#: (tests/test_redelivery.py).
GENERATION_DEADLINE_SECONDS = float(os.environ.get("GENERATION_DEADLINE_SECONDS", CHAT_TASK_SOFT_TIME_LIMIT * 0.8))
# Redis redelivers an unacknowledged message after the visibility timeout
# (default 1 h); it must exceed the hard time limit or a long generation
# would run twice (celery #5935).
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 2 * CELERY_TASK_TIME_LIMIT}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

#: Greenlets of the CPU worker (`-P gevent -c N`): external replies streamed
#: at once by one process. Each costs its stream's memory only
#: (docs/BENCHMARKS.md, "Concurrent streams").
CPU_WORKER_CONCURRENCY = int(os.environ.get("CPU_WORKER_CONCURRENCY", 1000))
#: CPU worker processes `make run` starts. The gevent pool is one thread,
#: so a process uses one core at most: on 2 cores, two processes ran a
#: 2,000-line batch at 125 lines/s against 76 with one, and 10 sockets at
#: the same rate (docs/BENCHMARKS.md, "The message path"). Two at most by
#: default: each process has its own database pool (DATABASE_POOL_MAX) and
#: broker connections; raise it on a box with more cores and connections.
CPU_WORKER_PROCESSES = max(1, int(os.environ.get("CPU_WORKER_PROCESSES", min(2, os.cpu_count() or 1))))
# kombu's Redis pool per worker process (10 connections by default) fails
# with "Too many connections" past its cap, and the consumer then drops the
# broker connection and requeues what it holds: every greenlet acking its
# message at once needs one.
CELERY_BROKER_TRANSPORT_OPTIONS["max_connections"] = CPU_WORKER_CONCURRENCY + 100

# --- Outside model servers (CONTRACT §2) ------------------------------------

OLLAMA_BASE_URL = os.environ.get("OLLAMA_BASE_URL", "http://127.0.0.1:11434")
OPENAI_BASE_URL = os.environ.get("OPENAI_BASE_URL", "")
OPENAI_API_KEY = os.environ.get("OPENAI_API_KEY", "")
#: Seconds to wait for an outside server to accept a connection; a down
#: endpoint must fail a request quickly, not hang the picker.
UPSTREAM_CONNECT_TIMEOUT = float(os.environ.get("UPSTREAM_CONNECT_TIMEOUT", 2.0))
#: Seconds between two streamed chunks before an upstream counts as stalled.
UPSTREAM_READ_TIMEOUT = float(os.environ.get("UPSTREAM_READ_TIMEOUT", 120.0))
#: Discovered model lists are cached this long: short enough that a model
#: pulled into Ollama shows up at once, long enough that a page load does not
#: hit every endpoint.
MODEL_DISCOVERY_TTL = float(os.environ.get("MODEL_DISCOVERY_TTL", 10.0))

# --- GPU manager ------------------------------------------------------------

#: Name of this GPU worker's slot; one worker per GPU, each consuming the
#: queue gpu.<slot> (set with CUDA_VISIBLE_DEVICES in docker-compose.yml).
GPU_SLOT = os.environ.get("GPU_SLOT", "0")
#: The slot whose GPU the Ollama server shares: Ollama's work is arbitrated
#: there, and local models on other GPUs never make room for it.
OLLAMA_GPU_SLOT = os.environ.get("OLLAMA_GPU_SLOT", "0")
#: "auto" = cuda when available, else cpu.
GPU_DEVICE = os.environ.get("GPU_DEVICE", "auto")
#: Ollama answers an unload before its VRAM is free; poll /api/ps this long
#: (its own scheduler waits up to 5 s for VRAM to come back: server/sched.go
#: in https://github.com/ollama/ollama).
OLLAMA_UNLOAD_TIMEOUT = float(os.environ.get("OLLAMA_UNLOAD_TIMEOUT", 15.0))
OLLAMA_UNLOAD_POLL = 0.05
#: An Ollama generation renews its GPU lease every TTL/3 while it streams; a
#: holder that dies stops holding the GPU after at most this many seconds.
GPU_LEASE_TTL = float(os.environ.get("GPU_LEASE_TTL", 15.0))
#: A lease granted before the generation starts must outlive the wait for a
#: free CPU worker (16 threads each: seconds at most under normal load).
GPU_LEASE_PENDING_TTL = float(os.environ.get("GPU_LEASE_PENDING_TTL", 120.0))
#: A local request waits at most this long for Ollama generations to end
#: (longer than the task time limit: a live generation always ends first).
GPU_LEASE_WAIT_TIMEOUT = float(os.environ.get("GPU_LEASE_WAIT_TIMEOUT", 900.0))
GPU_LEASE_POLL = 0.05
#: Bytes the local engines may hold together on the device (0 = no limit);
#: past it the least recently used engine is unloaded first.
GPU_LOCAL_BUDGET_BYTES = int(os.environ.get("GPU_LOCAL_BUDGET_BYTES", 0))
#: How often the GPU worker looks for idle models and dead lease holders.
GPU_HOUSEKEEPING_SECONDS = float(os.environ.get("GPU_HOUSEKEEPING_SECONDS", 5.0))
#: CONTRACT §5 asks for at least the last 500 transitions.
GPU_EVENTS_KEPT = int(os.environ.get("GPU_EVENTS_KEPT", 1000))
#: Who gets a GPU next (gpu_manager/scheduler.py, docs/gpu-arbitration.md
#: "Scheduling"): "grouped" serves one owner's work together and bounds
#: every wait with a gate; "fifo" serves in arrival order (the behaviour
#: before the scheduler), kept to measure the two side by side.
GPU_SCHEDULE = os.environ.get("GPU_SCHEDULE", "grouped")
#: The gate age A: once another owner's oldest request has waited this
#: long, the current owner's visit ends (after the work that came before).
#: A = max(floor, factor x the measured switch cost): a visit then costs at
#: most 1/(1+factor) of its time in switching.
GPU_GATE_FLOOR_SECONDS = float(os.environ.get("GPU_GATE_FLOOR_SECONDS", 2.0))
GPU_GATE_FACTOR = float(os.environ.get("GPU_GATE_FACTOR", 4.0))
#: When the current owner's queue runs empty and another owner waits, the
#: GPU stays this fraction of one switch's cost after the owner's last
#: request ended, while the gate is open (anticipatory scheduling, as disk
#: schedulers wait a few ms before a seek). Waiting is renting, switching is
#: buying: waiting up to one switch's cost before paying for one is the
#: classic ski-rental rule, never worse than twice the best choice made
#: knowing the future. A closed-loop user's or a batch's next request
#: comes within a round trip and keeps the GPU instead of costing two
#: switches.
GPU_LINGER_FACTOR = float(os.environ.get("GPU_LINGER_FACTOR", 1.0))
#: A batch line ranks this many seconds behind an interactive message on
#: the same GPU: interactive work goes first, and a batch line that has
#: waited this long competes as an equal (it ages; it never starves).
GPU_BATCH_DELAY_SECONDS = float(os.environ.get("GPU_BATCH_DELAY_SECONDS", 30.0))
#: A request whose projected wait for the GPU is longer is refused at once
#: with `gpu_busy` and the estimate, instead of waiting silently (Ollama
#: answers 503 when its queue is full).
GPU_MAX_WAIT_SECONDS = float(os.environ.get("GPU_MAX_WAIT_SECONDS", 900.0))
#: A reply still `queued` after this many seconds whose task is in no queue
#: (Redis came back empty and took it) is queued again by the GPU workers'
#: housekeeping (chat.services.replies_redispatch_lost). Far above the time
#: from a commit to its dispatch; a reply waiting in a long queue is never
#: taken for lost, however long it waits.
REPLY_REDISPATCH_AFTER_SECONDS = float(os.environ.get("REPLY_REDISPATCH_AFTER_SECONDS", 60.0))

DEMO_MODEL_DIR = Path(os.environ.get("DEMO_MODEL_DIR", VAR_DIR / "models" / "local_demo"))
DEMO_EMBEDDER_DIR = Path(os.environ.get("DEMO_EMBEDDER_DIR", VAR_DIR / "models" / "embed_demo"))
DEMO_TRANSLATOR_DIR = Path(os.environ.get("DEMO_TRANSLATOR_DIR", VAR_DIR / "models" / "translate_demo"))

# --- Knowledge bases and translation (CONTRACT §8, §9; docs/knowledge.md) -----

#: Where the knowledge bases' indexes live (one directory per index).
KNOWLEDGE_DIR = Path(os.environ.get("KNOWLEDGE_DIR", VAR_DIR / "knowledge"))
#: An upload's limits: per file, and files per request.
KNOWLEDGE_MAX_FILE_BYTES = int(os.environ.get("KNOWLEDGE_MAX_FILE_BYTES", 20 * 1024 * 1024))
KNOWLEDGE_MAX_FILES = int(os.environ.get("KNOWLEDGE_MAX_FILES", 20))
#: Bases one message may draw on.
KNOWLEDGE_MAX_BASES = int(os.environ.get("KNOWLEDGE_MAX_BASES", 5))
#: Chunks: the embedding model's tokens per chunk, and the overlap.
KNOWLEDGE_CHUNK_TOKENS = int(os.environ.get("KNOWLEDGE_CHUNK_TOKENS", 400))
KNOWLEDGE_CHUNK_OVERLAP = int(os.environ.get("KNOWLEDGE_CHUNK_OVERLAP", 50))
#: Passages given to a reply, best first, and the most of the prompt they
#: may take (in the embedding model's tokens; less when the chat model's
#: context is shorter: chat/knowledge/retrieve.py).
KNOWLEDGE_TOP_K = int(os.environ.get("KNOWLEDGE_TOP_K", 5))
KNOWLEDGE_PROMPT_TOKENS = int(os.environ.get("KNOWLEDGE_PROMPT_TOKENS", 1500))
#: Threads of the knowledge worker's pool, and torch's threads per task
#: (ingestion and a reply's retrieval must not wait for each other).
KNOWLEDGE_WORKER_CONCURRENCY = int(os.environ.get("KNOWLEDGE_WORKER_CONCURRENCY", 4))
#: Where an index's vectors live (docs/knowledge.md, "Where the vectors
#: live"): "embedded" (a matrix file in the index's directory; no server)
#: or "qdrant" (a Qdrant collection per index; BM25 stays in the directory).
#: Recorded in each index: one written before a change is still read.
KNOWLEDGE_STORE = os.environ.get("KNOWLEDGE_STORE", "embedded")
#: The Qdrant server for KNOWLEDGE_STORE=qdrant ("http://host:6333"). Blank:
#: qdrant-client's local mode in QDRANT_PATH, which one process at a time
#: may open (its lock), so the whole stack (web, GPU and knowledge workers)
#: needs a server.
QDRANT_URL = os.environ.get("QDRANT_URL", "")
QDRANT_PATH = Path(os.environ.get("QDRANT_PATH", VAR_DIR / "qdrant"))

# --- Chat -------------------------------------------------------------------

CHAT_MAX_CONTENT_CHARS = int(os.environ.get("CHAT_MAX_CONTENT_CHARS", 32_000))
#: Deltas are flushed to the socket at most this often (seconds): one
#: group_send from a worker thread costs ~1.7 ms on 2 cores (channels_redis;
#: docs/BENCHMARKS.md has the streaming figures), so one per token would cost more
#: than a tiny model's token; 40 ms still reads as smooth streaming.
CHAT_DELTA_FLUSH_SECONDS = 0.04
#: At most this many `chat.delta` frames a second from the CPU workers,
#: all their streams together, each of the CPU_WORKER_PROCESSES taking its
#: share: past that, each stream's flushes are spaced further apart
#: (chat/relay.py DeltaRelay.interval; 500 streams: 0.25 s). The budget is
#: the whole stack's because the frames all end in the web process's one
#: channel-layer key, which drops what is past its capacity: two CPU
#: workers each sending 2,000 a second lost replies' ends at 500 streams.
CHAT_FRAMES_PER_SECOND = float(os.environ.get("CHAT_FRAMES_PER_SECOND", 2000))
#: Each process writes its metrics to Redis at most this often (seconds),
#: added up (chat/metrics.py): a scrape sees a reply at most this late.
METRICS_FLUSH_SECONDS = float(os.environ.get("METRICS_FLUSH_SECONDS", 1.0))
#: A CPU worker sends the durations of its Ollama replies to the GPU
#: scheduler at most this often (seconds; gpu_manager/scheduler.py
#: ObservationBuffer): the scheduler sees a reply's service this late.
GPU_OBSERVE_FLUSH_SECONDS = float(os.environ.get("GPU_OBSERVE_FLUSH_SECONDS", 0.25))
#: A cancel flag outlives any generation (seconds).
CHAT_CANCEL_TTL = 3600
#: Per-user rate limit (chat/ratelimit.py): at most this many messages in any
#: CHAT_RATE_LIMIT_WINDOW seconds, from the socket and /v1/chat/completions
#: together (batch lines are paced by BATCH_MAX_IN_FLIGHT). A person reading
#: the replies sends a few a minute; 20 leaves room for Regenerate and quick
#: corrections while a script flooding the one GPU's queue is stopped within
#: seconds (LibreChat's example configuration: 40 a minute per IP, and per
#: user when that limit is on; MESSAGE_IP_MAX / MESSAGE_USER_MAX). 0 = off.
CHAT_RATE_LIMIT_MESSAGES = int(os.environ.get("CHAT_RATE_LIMIT_MESSAGES", 20))
CHAT_RATE_LIMIT_WINDOW = float(os.environ.get("CHAT_RATE_LIMIT_WINDOW", 60.0))

LOG_FORMAT = os.environ.get("LOG_FORMAT", "plain")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "context": {"()": "chatsite.logs.ContextFilter"},
        # /readyz answers 503 on every probe while workers start; the view
        # logs each change of readiness itself (chat/views.py), and
        # django.request's ERROR per probe would bury real errors.
        "probes": {"()": "chatsite.logs.ProbeFilter", "paths": ["/readyz"]},
    },
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [task=%(task_id)s message=%(message_id)s] "
                            "%(message)s"},
        "json": {"()": "chatsite.logs.JsonFormatter"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "json" if LOG_FORMAT == "json" else "plain",
                    "filters": ["context"]},
    },
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"httpx": {"level": "WARNING"}, "httpcore": {"level": "WARNING"},
                "django.request": {"filters": ["probes"]},
                # Failures and lockouts are WARNINGs; axes' INFO is four lines
                # of bookkeeping per successful login.
                "axes": {"level": "WARNING"}},
}
#: Workers refresh a liveness key this often (seconds); /readyz counts a
#: worker as gone when its key is older than the TTL (three missed beats).
WORKER_HEARTBEAT_SECONDS = 5.0
WORKER_HEARTBEAT_TTL = 15

# --- Batches and the OpenAI-compatible API (issue 5; chat/batches.py, chat/api/) ---

#: Broker priority of batch lines. kombu's Redis transport keeps one list per
#: queue and priority step (0, 3, 6, 9) and BRPOPs them lowest step first
#: (kombu/transport/redis.py `_brpop_start`), so a worker takes a batch line
#: only when no interactive message (priority 0: none given) is waiting.
BATCH_PRIORITY = 9
#: Lines of one batch with a queued or running reply at once. It bounds what
#: a cancel must let finish, the Ollama leases granted ahead of generation,
#: and how far an interactive message can fall behind a batch. With one
#: gevent CPU worker a batch's own dispatching, not the window, sets its
#: pace (bench/batch_throughput.py prints the lines in flight): windows of
#: 64 and 256 measured no faster.
BATCH_MAX_IN_FLIGHT = int(os.environ.get("BATCH_MAX_IN_FLIGHT", 16))
#: OpenAI's limits for one batch input (https://platform.openai.com/docs/guides/batch).
BATCH_MAX_LINES = 50_000
BATCH_MAX_FILE_BYTES = 200 * 1024 * 1024
#: While a batch runs, it is looked at this often (seconds) even if none of
#: its lines ends through a task: a reply can be ended by a worker's start-up
#: or lease reaping, which queue no follow-up.
BATCH_WATCHDOG_SECONDS = 10.0
#: A batch's advance holds its lock at most this long (seconds); validating
#: 50,000 lines takes a few.
BATCH_LOCK_SECONDS = 120
#: /v1/chat/completions waits this long for a reply to end: the task's hard
#: time limit plus a minute in the queue.
API_REPLY_TIMEOUT = CELERY_TASK_TIME_LIMIT + 60
#: With no frame for this long, the view reads the reply from the database
#: (an end frame the channel layer dropped must not hang the request).
API_IDLE_CHECK_SECONDS = 5.0
#: An API key's `last_used_at` is written at most this often (seconds).
API_KEY_TOUCH_SECONDS = 60
#: `/v1/embeddings` (chat/embeddings.py): at most this many inputs a request,
#: OpenAI's own limit ("any array must be 2048 dimensions or less", the
#: `input` parameter in https://platform.openai.com/docs/api-reference/embeddings/create).
EMBEDDINGS_MAX_INPUTS = 2048
#: ... and at most this many characters an input: OpenAI's 8,192 tokens an
#: input (same page) at about 4 characters a token. A local model truncates
#: at its own length below that (its tokenizer's model_max_length).
EMBEDDINGS_MAX_INPUT_CHARS = int(os.environ.get("EMBEDDINGS_MAX_INPUT_CHARS", 32_000))
#: ... and at most this many tokens a request, all inputs together (token
#: ids counted as they are, text at 4 characters a token): OpenAI's "maximum
#: of 300,000 tokens summed across all inputs" (same page). It also bounds
#: the task's message in the broker (about 1.2 MB of text).
EMBEDDINGS_MAX_REQUEST_TOKENS = 300_000
#: An Ollama embedding run on the CPU (`num_gpu: 0`, while the GPU is not
#: Ollama's) asks Ollama to keep that CPU copy this long (seconds; Ollama's
#: `keep_alive`). 0: unloaded as soon as it answered, because a copy still
#: listed in /api/ps when the GPU worker hands the GPU to the local models
#: holds that hand-over up until OLLAMA_UNLOAD_TIMEOUT (it waits for /api/ps
#: to list nothing). The price: a load per request (docs/gpu-arbitration.md,
#: "Embeddings").
OLLAMA_EMBED_CPU_KEEP_ALIVE = float(os.environ.get("OLLAMA_EMBED_CPU_KEEP_ALIVE", 0))
#: The largest request body Django reads (bytes; its DATA_UPLOAD_MAX_MEMORY_SIZE,
#: 2.5 MB by default). A /v1 chat request carries its images inline as
#: base64 data: URLs, and OpenAI takes images of up to 20 MB, a third more
#: as base64 (https://platform.openai.com/docs/guides/images-vision,
#: "Image input requirements"). A larger body gets a 413 in OpenAI's shape
#: (chat/api/http.py json_body). Uploaded files (multipart) are not bound
#: by it: Django streams them to disk past FILE_UPLOAD_MAX_MEMORY_SIZE.
DATA_UPLOAD_MAX_MEMORY_SIZE = int(os.environ.get("API_MAX_BODY_BYTES", 32 * 1024 * 1024))
