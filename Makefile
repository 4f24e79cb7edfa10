# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STATE := .run
BUF := tools/node_modules/.bin/buf
# Every folder scripts/gen_protos.py writes (make stubs-check covers them all).
GENERATED := clients/python/src/cachecoord_client/proto clients/node/src/gen clients/go/cachecoordv1
# The released contract that buf breaking compares against (make proto-snapshot).
RELEASED_PROTOS := protos/released/cachecoord-v1.txtpb
# Debian packages of the Go stub plugins (package name = command name).
DEBIAN_PLUGINS := protoc-gen-go protoc-gen-go-grpc
# Debian's Go toolchain and the Go sources the Go client builds with in GOPATH
# mode (tests/integration/test_go_client.py; no Go module proxy is reachable).
# golang/protobuf 1.5 is named: grpc-dev's first alternative is 1.3, and
# grpc-go 1.33 needs 1.4 or newer (its go.mod).
DEBIAN_GO := golang-go golang-google-grpc-dev golang-google-protobuf-dev \
	golang-github-golang-protobuf-1-5-dev
# promtool (Debian's prometheus package) checks deploy/prometheus's alert rules.
DEBIAN_CHECKS := prometheus
NODE := clients/node
NODE_SOURCES := $(shell find $(NODE)/src $(NODE)/examples $(NODE)/e2e -name '*.ts' 2>/dev/null)
DIST_SOURCES := $(shell find server clients/python/src -name '*.py' -o -name '*.pyi' -o -name py.typed 2>/dev/null)
WHEELHOUSE := build/wheelhouse
UV_VERSION := 0.13.9
UV := tools/uv/bin/uv

.PHONY: run test check lock lock-check lint typecheck proto-lint proto-breaking proto-snapshot stubs stubs-check \
	dockerfile-lint rules-check install tools debian-tools node-client dist down clean bench

## run: serve the example configuration on 127.0.0.1:50051 (reuses a reachable
## Redis and PostgreSQL, or starts private ones from the installed binaries)
run: install
	@eval "$$($(BIN)/python scripts/local_servers.py up --state-dir $(STATE) \
	    --redis-url "$${CACHECOORD_REDIS_URL:-redis://127.0.0.1:6379/0}" \
	    --database-url "$${CACHECOORD_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/postgres}")" && \
	export CACHECOORD_REDIS_URL && \
	export CACHECOORD_DATABASE_URL="$$($(BIN)/python scripts/example_db.py "$$CACHECOORD_DATABASE_URL")" && \
	$(BIN)/cachecoord triggers install users --config examples/cachecoord.toml && \
	exec $(BIN)/cachecoord serve --config examples/cachecoord.toml

## test: the whole suite (it starts its own private Redis and PostgreSQL; the
## Node.js client and the wheels are built first, for their end-to-end tests)
test: install tools node-client dist
	$(BIN)/pytest tests clients/python/tests --reruns 1 --reruns-delay 2

## bench: every benchmark scenario (private Redis, PostgreSQL and servers of
## its own), then docs/benchmarks.png; under 10 minutes on a 2-core machine
bench: install
	$(BIN)/python -m bench all

## check: lint, types, proto lint and breaking changes, generated-stub
## freshness (Python, TypeScript, Go), the Node.js client's types, Dockerfile lint,
## the Prometheus alert rules
check: lock-check lint typecheck proto-lint proto-breaking stubs-check sync-client-check node-client \
	dockerfile-lint rules-check

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy
	$(BIN)/mypy deploy/healthcheck.py

proto-lint: $(BUF)
	$(BUF) lint

## proto-breaking: the contract must stay compatible with the released one
proto-breaking: $(BUF)
	$(BUF) breaking --against $(RELEASED_PROTOS)

## proto-snapshot: record the current contract as released (run when tagging a release)
proto-snapshot: $(BUF)
	$(BUF) build --exclude-source-info -o $(RELEASED_PROTOS)

## stubs: regenerate the Python, TypeScript and Go stubs from protos/
stubs: install tools
	$(BIN)/python scripts/gen_protos.py

stubs-check: stubs
	@git diff --exit-code -- $(GENERATED) && \
	test -z "$$(git status --porcelain -- $(GENERATED))" || \
	(echo "generated stubs are stale: run 'make stubs' and commit"; exit 1)

## sync-client: regenerate the blocking Python client (sync.py) from the asyncio one (client.py)
SYNC_CLIENT := clients/python/src/cachecoord_client/sync.py
.PHONY: sync-client sync-client-check
sync-client: install
	$(BIN)/python scripts/gen_sync_client.py

sync-client-check: sync-client
	@git diff --exit-code -- $(SYNC_CLIENT) && \
	test -z "$$(git status --porcelain -- $(SYNC_CLIENT))" || \
	(echo "the blocking client is stale: run 'make sync-client' and commit $(SYNC_CLIENT)"; exit 1)

dockerfile-lint: install
	$(BIN)/hadolint Dockerfile

## rules-check: promtool checks the alert rules and runs their unit tests
rules-check: debian-tools
	promtool check rules deploy/prometheus/cachecoord-alerts.yaml
	promtool test rules deploy/prometheus/cachecoord-alerts.test.yaml

install: $(VENV)/.installed

# Exactly the set in uv.lock (the server, the client and the dev tools); fails
# when pyproject.toml and the lock disagree (run `make lock`).
$(VENV)/.installed: pyproject.toml uv.lock clients/python/pyproject.toml | $(UV)
	$(UV) sync --locked --python $(PYTHON)
	touch $@

# uv itself, pinned, in a venv of its own (PyPI's uv wheel carries the binary).
$(UV):
	$(PYTHON) -m venv tools/uv
	tools/uv/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

## lock: upgrade every locked dependency to the newest release pyproject.toml
## allows (then run make test and commit uv.lock)
lock: | $(UV)
	$(UV) lock --upgrade

## lock-check: fails when uv.lock does not match pyproject.toml
lock-check: | $(UV)
	$(UV) lock --check

## tools: buf and ts-proto (npm, pinned in tools/), Debian's Go stub plugins,
## Go toolchain and Go sources (for the Go client's test)
tools: $(BUF) debian-tools

$(BUF): tools/package.json tools/package-lock.json
	cd tools && npm ci --silent --no-audit --no-fund
	touch $@

# Installs the plugins and the Go packages only when one is missing (CI runs
# as root; a developer without root gets the apt-get line to run).
debian-tools:
	@missing=""; for p in $(DEBIAN_PLUGINS); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	for p in $(DEBIAN_GO) $(DEBIAN_CHECKS); do \
	  dpkg-query -W -f '$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing:$$missing; run: sudo apt-get install$$missing"; exit 1; fi; \
	  echo "apt-get install$$missing"; log=$$(mktemp); \
	  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	         apt-get install -y -qq --no-install-recommends $$missing; } >$$log 2>&1; then \
	    cat $$log; rm -f $$log; exit 1; \
	  fi; rm -f $$log; \
	fi

## node-client: install clients/node's dependencies and compile it (tsc -> dist/)
node-client: $(NODE)/dist/.built

$(NODE)/node_modules/.installed: $(NODE)/package.json $(NODE)/package-lock.json
	cd $(NODE) && npm ci --silent --no-audit --no-fund
	touch $@

$(NODE)/dist/.built: $(NODE)/node_modules/.installed $(NODE)/tsconfig.json $(NODE_SOURCES)
	cd $(NODE) && npm run --silent build
	touch $@

## dist: wheels and sdists of both distributions in dist/ (built with the
## venv's setuptools, offline), and the wheels of the client's dependencies in
## build/wheelhouse/, twice: as installed in the venv, and the oldest versions
## the client declares (for tests/integration/test_client_wheel.py)
dist: dist/.built

# "grpcio==1.63.2 protobuf==5.26.1": the lower bounds of the client's dependencies.
CLIENT_OLDEST := import re, tomllib; \
	deps = tomllib.load(open('clients/python/pyproject.toml', 'rb'))['project']['dependencies']; \
	print(*(re.sub(r'>=([^,;]+).*', r'==\1', d) for d in deps))

dist/.built: pyproject.toml clients/python/pyproject.toml README.md clients/python/README.md \
		$(DIST_SOURCES) | install
	rm -rf dist
	$(BIN)/python -m build --no-isolation --outdir dist clients/python >/dev/null
	$(BIN)/python -m build --no-isolation --outdir dist . >/dev/null
	newest="$$($(BIN)/pip list --format=freeze 2>/dev/null | grep -iE '^(grpcio|protobuf)==')" && \
	oldest="$$($(BIN)/python -c "$(CLIENT_OLDEST)")" && \
	for deps in "$$newest" "$$oldest"; do \
	  $(BIN)/pip download --quiet --no-index --find-links $(WHEELHOUSE) --dest $(WHEELHOUSE) $$deps 2>/dev/null || \
	  $(BIN)/pip download --quiet --only-binary=:all: --dest $(WHEELHOUSE) $$deps || exit 1; \
	done
	ls dist
	touch $@

## down: stop the private servers `make run` started
down:
	$(BIN)/python scripts/local_servers.py down --state-dir $(STATE)

clean: down
	rm -rf $(VENV) tools/uv tools/node_modules $(NODE)/node_modules $(NODE)/dist dist build
