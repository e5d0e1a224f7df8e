# The two commands of the README: `make serve` and `make test`. Each installs what it needs first.
PYTHON ?= python3
APT_PACKAGES = chromium bubblewrap prometheus openssl

.PHONY: serve test screenshot bench install install-python install-node install-system

serve: install-python install-node
	$(PYTHON) -m remoterun serve --config config.toml

test: install
	$(PYTHON) -m pytest

# Refresh docs/*.png (the README's pictures) from the page tests.
screenshot: install
	REMOTERUN_SCREENSHOT=1 $(PYTHON) -m pytest tests/test_page.py tests/test_page_console.py \
	  tests/test_page_stats.py -k "screenshot or 360"

install: install-system install-python install-node

install-python:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[test]'

install-node:
	@if [ -f package-lock.json ]; then npm ci --no-audit --no-fund --loglevel=error; fi

# Debian packages for the browser tests, the sandbox and the dashboard test (prometheus);
# skipped when already there.
install-system:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
