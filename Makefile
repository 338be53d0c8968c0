# tessera: `make demo` and `make test` each set up everything on a fresh machine, then run.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONDONTWRITEBYTECODE := 1
PYTEST_ARGS ?=
# test files run in parallel, one file per worker at a time (most tests wait on subprocesses, mounts
# and the S3 server, so 3 workers keep 2 cores busy); TEST_WORKERS=0 runs them in one process, in order
TEST_WORKERS ?= 3

.PHONY: all deps sysdeps pydeps demo test typecheck bench clean

all: test

deps: sysdeps pydeps

# System packages (fuse3 for mounts, rsync for the mount tests); idempotent, needs root.
sysdeps:
	@bash .ci/sysdeps

# A venv with torch 2.13.0 CPU installed first (so nothing pulls CUDA builds), then tessera + test deps.
pydeps: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0 numpy
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,fusepy,ray]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: deps
	bash tests/demo.sh

test: deps typecheck
	pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=20 $(PYTEST_ARGS) tests

# mypy --strict over lib/, fuse/ and daemon/ as the package `tessera` (a tree of symlinks: setuptools maps
# tessera = lib, tessera.fuse = fuse, tessera.daemon = daemon; mypy cannot read that mapping).
typecheck: deps
	@rm -rf build/typecheck && mkdir -p build/typecheck/tessera
	@for f in lib/*; do ln -s "$$PWD/$$f" build/typecheck/tessera/; done
	@ln -s "$$PWD/fuse" build/typecheck/tessera/fuse && ln -s "$$PWD/daemon" build/typecheck/tessera/daemon
	cd build/typecheck && $(abspath $(VENV))/bin/mypy --config-file ../../pyproject.toml tessera

bench: deps
	@command -v restic >/dev/null && command -v borg >/dev/null || (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq restic borgbackup >/dev/null || echo "peers not installable; skipping them")
	$(PY) tests/bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
