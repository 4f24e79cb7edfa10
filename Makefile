# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STATE := .run
BUF := tools/node_modules/.bin/buf
GENERATED := clients/python/src/cachecoord_client/proto

.PHONY: run test check lint typecheck proto-lint stubs stubs-check dockerfile-lint install down clean

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

## test: the whole suite (it starts its own private Redis and PostgreSQL)
test: install $(BUF)
	$(BIN)/pytest tests clients/python/tests

## check: lint, types, proto lint, generated-stub freshness, Dockerfile lint
check: lint typecheck proto-lint stubs-check dockerfile-lint

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

proto-lint: $(BUF)
	$(BUF) lint

stubs: install
	$(BIN)/python scripts/gen_protos.py

stubs-check: stubs
	@git diff --exit-code -- $(GENERATED) && \
	test -z "$$(git status --porcelain -- $(GENERATED))" || \
	(echo "generated stubs are stale: run 'make stubs' and commit"; exit 1)

dockerfile-lint: install
	$(BIN)/hadolint Dockerfile

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e clients/python -e '.[dev]'
	touch $@

$(BUF): tools/package.json tools/package-lock.json
	cd tools && npm ci --silent --no-audit --no-fund
	touch $@

## down: stop the private servers `make run` started
down:
	$(BIN)/python scripts/local_servers.py down --state-dir $(STATE)

clean: down
	rm -rf $(VENV) tools/node_modules
