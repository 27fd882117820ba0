# Two entry points for a fresh machine (Python 3.11, pip, npm): `make demo` and `make test`.
# Both create or refresh .venv when pyproject.toml changes.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo samplers-benchmark test test-slow lint format venv clean default-model

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and pinned: the CPU wheel on this disk; a looser range pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# clean-fid's resizer is a test oracle; its package requires torchvision, which breaks this torch: no deps
	$(PY) -m pip install -q --no-deps clean-fid==0.1.35
	touch $(STAMP)

venv: $(STAMP)

# The main job: a digit from the embedded default model, with no download (PNG with its parameters in outputs/).
demo: venv
	$(VENV)/bin/unnoise generate "a handwritten seven"

samplers-benchmark: venv
	$(PY) benchmarks/samplers.py

test: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

# Rebuild the embedded default model (unnoise/weights/mnist-ldm) from scratch: about 1.5 h on 2 CPU cores.
default-model: venv
	$(VENV)/bin/unnoise train-classifier --out unnoise/weights/mnist-ldm/classifier
	$(VENV)/bin/unnoise train configs/mnist-vae.toml
	$(VENV)/bin/unnoise train configs/mnist-ldm.toml
	$(PY) scripts/build_default_model.py

lint: venv
	$(PY) -m ruff check .

format: venv
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
