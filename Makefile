# The two commands of the README:  `make run`  and  `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser nginx run run-cluster test lint bench clean

# A virtualenv with every dependency pinned by constraints.txt (re-done when either file changes).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# Serve on http://127.0.0.1:8080 with the built-in local provider (settings: .env.example).
run: $(STAMP)
	$(BIN)/python -m web

# WORKERS=N make run-cluster: N nodes of one service on ports 8080, 8081, ... against the Redis at
# REDIS_URL (default redis://127.0.0.1:6379/0), sharing IMAGES_DIR (default var/images) and
# the signing key kept in Redis. Any node accepts any request (put a load balancer in front);
# Ctrl-C stops them all, each handing its running jobs over (README: "Running several nodes").
WORKERS ?= 2
run-cluster: $(STAMP)
	@trap 'kill $$(jobs -p) 2>/dev/null; wait' INT TERM EXIT; \
	for i in $$(seq 0 $$(($(WORKERS) - 1))); do \
	  STORE=redis PORT=$$((8080 + i)) $(BIN)/python -m web & \
	done; \
	wait

# $(call debian_package,PROGRAM,PACKAGE,TESTS): install Debian's PACKAGE when PROGRAM is
# missing, only as root (as in CI); elsewhere TESTS skip (under CI=true they fail instead).
debian_package = if [ -x $(1) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $(2); \
	else echo "$(1) is missing and we are not root: $(3) will skip" >&2; fi

# Debian's Chromium for the browser tests (tests/browser/; Playwright's own browser download is
# not used).
CHROMIUM := /usr/bin/chromium
browser:
	@$(call debian_package,$(CHROMIUM),chromium,the browser tests)

# Debian's nginx for the reverse-proxy tests (tests/e2e/test_proxy.py runs it as a child process
# on docs/deploy/nginx.conf).
NGINX := /usr/sbin/nginx
nginx:
	@$(call debian_package,$(NGINX),nginx,the proxy tests)

# The whole test suite. pytest exits 5 when it collects nothing: a broken suite, so a failure.
test: $(STAMP) browser nginx
	@$(BIN)/python -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: the suite is broken" >&2; exit 1; fi; \
	exit $$status

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/flake8-async --enable=ASYNC1,ASYNC2,ASYNC4,ASYNC913 --disable=ASYNC124,ASYNC127 \
	  --startable-in-context-manager=run,serve,run_server,follow \
	  --async200-blocking-calls='replicate.run->the trio-safe provider,replicate.stream->the trio-safe provider,*.predictions.create->the trio-safe provider or trio.to_thread' \
	  $$(git ls-files '*.py')
	$(BIN)/mypy
	! git grep -nE 'open_memory_channel[^(]*\(\s*(math\.)?inf' -- actors web
	! git grep -nE '\.(async_wait|async_stream|async_output_iterator)\(' -- actors web
	! git grep -nE '^\s*(import|from) replicate' -- actors web ':!actors/providers/replicate.py'

clean:
	rm -rf $(VENV) var
