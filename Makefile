# The two commands of the README: `make serve` and `make test`. Each installs what it needs first,
# into .venv (made here: Debian's and Ubuntu's python3 refuse a system-wide pip, PEP 668), and only
# when pyproject.toml, setup.py or package-lock.json changed since (the stamp files below).
SYSTEM_PYTHON ?= python3
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
# e.g. SERVE_ARGS="--port 8081"
SERVE_ARGS ?=
# Tests, and the programs they start, find the venv's `python3` and `remoterun` first.
export PATH := $(abspath $(VENV))/bin:$(PATH)
# Make the venv only when PYTHON is the venv's (PYTHON=python3 uses an environment of one's own,
# whose stamps live under build/).
VENV_PYTHON = $(filter $(VENV)/bin/python,$(PYTHON))
STAMPS = $(if $(VENV_PYTHON),$(VENV),build/stamps)
RUNTIME_STAMP = $(STAMPS)/.installed-runtime
TEST_STAMP = $(STAMPS)/.installed-test
NODE_STAMP = node_modules/.installed
# strace and systemd (systemd-analyze) check deploy/remoterun.service; neither starts a service
# (systemd is installed wherever it runs as init; in a container there is no init to start).
APT_PACKAGES = chromium bubblewrap libseccomp2 prometheus openssl docker.io debootstrap \
	postgresql redis-server strace systemd runsc

.PHONY: serve test screenshot bench bench-install install install-runtime install-python install-node install-system vendor dist image

serve: install-runtime install-node
	$(PYTHON) -m remoterun serve --config config.toml $(SERVE_ARGS)

test: install
	$(PYTHON) -m pytest

# Refresh docs/*.png (the README's pictures) from the page tests.
screenshot: install
	REMOTERUN_SCREENSHOT=1 $(PYTHON) -m pytest tests/test_page.py tests/test_page_console.py \
	  tests/test_page_stats.py tests/test_page_i18n.py -k "screenshot or 360"

install: install-system install-node install-python

# The benchmarks (bench/README.md), the peer they measure against installed first: webhook
# (Debian package) and py-spy for `--profile`. BENCH_ARGS, e.g. BENCH_ARGS="--quick".
BENCH_APT = webhook
bench: bench-install
	$(PYTHON) bench/run.py $(BENCH_ARGS)

bench-install: install-python
	@missing=""; for p in $(BENCH_APT); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	$(PYTHON) -m pip install --quiet --disable-pip-version-check py-spy==0.4.3

# Copy the pinned xterm.js packages from node_modules into remoterun/page/vendor (a wheel or
# sdist build does this itself; the server serves that copy first, then node_modules).
vendor: install-runtime install-node
	$(PYTHON) setup.py -q vendor

# The wheel and the sdist, each with the whole page inside, under dist/.
dist: install-runtime install-node
	$(PYTHON) -m pip wheel --no-deps -q -w dist .

# The container image (Dockerfile): the wheel and its dependencies' wheels, then docker build.
# BASE may be a locally imported Debian image where no registry is reachable.
BASE ?= debian:bookworm-slim
image: install-runtime install-node
	rm -rf dist/wheels && $(PYTHON) -m pip wheel -q -w dist/wheels .
	docker build --build-arg BASE=$(BASE) -t remoterun .

# The runtime alone (what `make serve` needs), or with the test packages (`make test`).
install-runtime: $(RUNTIME_STAMP)
install-python: $(TEST_STAMP)

$(VENV)/bin/python:
	@$(SYSTEM_PYTHON) -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null || { \
	  echo "make: RemoteRun needs Python 3.11 or later as $(SYSTEM_PYTHON) (or SYSTEM_PYTHON=...)"; exit 1; }
	@$(SYSTEM_PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "make: $(SYSTEM_PYTHON) cannot make a virtual environment; on Debian or Ubuntu:"; \
	  echo "    sudo apt-get install python3-venv"; exit 1; }
	$(SYSTEM_PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }

$(RUNTIME_STAMP): pyproject.toml setup.py | $(VENV_PYTHON)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e .
	@mkdir -p $(@D) && touch $@

# The test packages include the runtime's: the runtime stamp is fresh too.
$(TEST_STAMP): pyproject.toml setup.py | $(VENV_PYTHON)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@mkdir -p $(@D) && touch $@ $(RUNTIME_STAMP)

install-node: $(NODE_STAMP)

$(NODE_STAMP): package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# Debian packages for the browser tests, the sandbox, the dashboard test (prometheus) and the
# cluster tests (postgresql, redis-server: started by the tests themselves, never as services);
# skipped when already there.
install-system:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
