# The two commands of the README: `make serve` and `make test`. Each installs what it needs first.
PYTHON ?= python3
APT_PACKAGES = chromium bubblewrap libseccomp2 prometheus openssl docker.io debootstrap postgresql redis-server

.PHONY: serve test screenshot bench bench-install install install-python install-node install-system vendor dist image

serve: install-python install-node
	$(PYTHON) -m remoterun serve --config config.toml

test: install
	$(PYTHON) -m pytest

# Refresh docs/*.png (the README's pictures) from the page tests.
screenshot: install
	REMOTERUN_SCREENSHOT=1 $(PYTHON) -m pytest tests/test_page.py tests/test_page_console.py \
	  tests/test_page_stats.py -k "screenshot or 360"

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
vendor: install-node
	$(PYTHON) setup.py -q vendor

# The wheel and the sdist, each with the whole page inside, under dist/.
dist: install-node
	$(PYTHON) -m pip wheel --no-deps -q -w dist .

# The container image (Dockerfile): the wheel and its dependencies' wheels, then docker build.
# BASE may be a locally imported Debian image where no registry is reachable.
BASE ?= debian:bookworm-slim
image: install-node
	rm -rf dist/wheels && $(PYTHON) -m pip wheel -q -w dist/wheels .
	docker build --build-arg BASE=$(BASE) -t remoterun .

install-python:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[test]'

install-node:
	@if [ -f package-lock.json ]; then npm ci --no-audit --no-fund --loglevel=error; fi

# Debian packages for the browser tests, the sandbox, the dashboard test (prometheus) and the
# cluster tests (postgresql, redis-server: started by the tests themselves, never as services);
# skipped when already there.
install-system:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
