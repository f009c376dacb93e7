# kaggle-tta — `make infer` runs the embedded demo offline; `make test` runs the tests.
PYTHON     ?= python3
PIP        ?= $(PYTHON) -m pip
# torch is not pinned by the package; this pair is what we test with (on these machines pip
# takes it from local disk). Override for another platform: make install TORCH_PAIR="torch torchvision"
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1
PIPELINE   ?= pipeline.yaml
DEMO_DIR   ?= build/demo/test
# mypy's cache outside the checkout: a fresh clone on a machine that checked before takes
# seconds, not 34 s (the cache is keyed by each file's content)
MYPY_CACHE ?= $(HOME)/.cache/kaggle-tta/mypy

.PHONY: install infer run blend examples demo-data demo-weights test bench kernel clean help

help:
	@echo "make infer        install what is missing, write the demo test set, run pipeline.yaml"
	@echo "make test         install what is missing, run ruff, mypy and the test suite"
	@echo "make blend        re-blend from the cache (no model, no image)"
	@echo "make examples     run examples/segmentation.yaml and examples/detection.yaml on the demo set"
	@echo "make bench        run benchmarks/ and write bench-results/bench.md"
	@echo "make demo-weights retrain the demo members (kaggle_tta/demo/weights)"
	@echo "make kernel       build the offline Kaggle dataset + notebook under build/kaggle"

# Installs only what is missing: the torch pair first (so pip does not pick another build),
# then the package (editable) with its test extras.
# (What is installed is read from the distributions' metadata, not by importing them: importing
# torch, timm, scikit-learn and the rest took 14 s of every `make test`.)
install:
	@$(PYTHON) -c "import importlib.metadata as m; m.version('torch'); m.version('torchvision')" 2>/dev/null || $(PIP) install $(TORCH_PAIR)
	@$(PYTHON) -c "import importlib.metadata as m; [m.version(d) for d in ('kaggle-tta', 'timm', 'albumentations', 'ensemble-boxes', 'polars', 'tqdm', 'safetensors', 'opencv-python-headless', 'ttach', 'pytest', 'nbclient', 'nbformat', 'ipykernel', 'pycocotools', 'pydicom', 'pylibjpeg', 'pylibjpeg-openjpeg', 'tifffile', 'scikit-learn')]; assert m.version('ruff') == '0.17.6' and m.version('mypy') == '2.4.1'" 2>/dev/null \
		|| $(PIP) install -e '.[test]'

demo-data: install
	$(PYTHON) -m kaggle_tta demo-data $(DEMO_DIR)

infer: demo-data
	$(PYTHON) -m kaggle_tta run $(PIPELINE)

run: infer

blend: install
	$(PYTHON) -m kaggle_tta blend $(PIPELINE)

examples: demo-data
	$(PYTHON) -m kaggle_tta run examples/segmentation.yaml
	$(PYTHON) -m kaggle_tta run examples/detection.yaml

demo-weights: install
	$(PYTHON) -m kaggle_tta.demo.train $(PIPELINE)
	$(PYTHON) -m kaggle_tta.demo.train_tasks segmentation --out kaggle_tta/demo/weights/seg_unet.safetensors
	$(PYTHON) -m kaggle_tta.demo.train_tasks detection --out kaggle_tta/demo/weights/det_centernet.safetensors

# Lint and types first (seconds), then the suite.
test: install
	$(PYTHON) -m ruff check kaggle_tta tests benchmarks
	$(PYTHON) -m ruff format --check kaggle_tta tests benchmarks
	$(PYTHON) -m mypy --cache-dir $(MYPY_CACHE) kaggle_tta
	$(PYTHON) -m pytest

bench: install
	$(PYTHON) benchmarks/run.py --out bench-results

kernel: demo-data
	$(PYTHON) -m kaggle_tta kernel $(PIPELINE) --out build/kaggle

clean:
	rm -rf build cache submission.csv submission_segmentation.csv submission_detection.csv bench-results
