# Two commands: `make demo` runs the whole pipeline on the built-in synthetic world; `make test` runs the suite.
# `make test-fast` runs the suite without the tests marked slow (the heavy end-to-end ones).
# Both create .venv on first use and reinstall only when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast system-packages

demo: $(VENV)/.stamp-install
	$(BIN)/reid-batch demo

test: $(VENV)/.stamp-test system-packages
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.stamp-test system-packages
	$(BIN)/python -m pytest -q -m "not slow"

$(VENV)/.stamp-install: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.stamp-test: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.stamp-install

# Debian packages the suite needs (listed in tests/system-packages.txt); installed only when run as root.
system-packages:
	@pkgs="$$(grep -v '^#' tests/system-packages.txt | xargs)"; \
	if [ -n "$$pkgs" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		missing=""; for p in $$pkgs; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
		if [ -n "$$missing" ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
		fi; \
	fi
