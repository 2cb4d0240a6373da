# `make run`: set-up, then train the default preset on Fashion-MNIST, write samples and test bits/dim.
# `make test`: set-up, then the whole test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
RUN_DIR ?= runs/fashion-mnist
PRESET ?= fashion-mnist-cpu
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup run test test-fast bench data browser clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e ".[demo,test]"
	touch $(STAMP)

# Installs Debian's Fashion-MNIST when it is missing and apt-get is there.
data:
	@if [ ! -d $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null; then \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST not found at $(FMNIST) and apt-get is not available"; exit 1; fi; \
	fi

# Headless Chromium for the browser test; the test skips with a reason when this fails.
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium) || echo "chromium not installed: browser test will skip"; \
	fi

run: setup data
	$(VENV)/bin/glowflow train --preset $(PRESET) --data $(FMNIST) --out $(RUN_DIR)
	$(VENV)/bin/glowflow sample $(RUN_DIR) --n 64 --temperature 0.7 --out $(RUN_DIR)/samples.png
	$(VENV)/bin/glowflow eval $(RUN_DIR) --data $(FMNIST) --json

test: setup browser
	$(VENV)/bin/python -m pytest -q

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow and not browser"

bench: setup
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]"
	$(PY) benchmarks/speed.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
