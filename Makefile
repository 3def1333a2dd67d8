# Two commands on a fresh machine:  `make demo` (install + run the main job)  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= outputs/demo

.PHONY: setup demo journey test test-fast lint bench clean-demo

setup: $(VENV)/.installed

# constraints.txt pins every installed package to the versions the tests pass with; torch is its CPU build
# (any other torch would pull a multi-GB CUDA build). open_clip_torch is installed without its dependencies:
# erasekit only reads the CLIP BPE vocabulary file it ships (for the offline tiny pipelines); its torchvision
# dependency is not needed.
# --no-compile: Python compiles the modules it imports on first use; byte-compiling every file of torch
# at install time only lengthens `make demo`. Upgrading pip first pays for itself: the same install took
# 92 s with pip 26.3 against 123 s with the venv's pip 23.2.1 (side by side, machine shared and loaded).
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-compile --no-deps -c constraints.txt open_clip_torch
	touch $@

# The main job: erase "circle" from the embedded ShapesCanvas model on the CPU and write the
# before/after report (metrics.json, grid.png, report.html) to outputs/demo.
demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/erasekit demo --output $(OUT) --overwrite

# The command-line journey on a tiny random FLUX pipeline built locally: build -> erase -> generate
# with and without the mask -> prune-fold -> load with stock diffusers.
JOURNEY ?= outputs/journey
journey: setup
	rm -rf $(JOURNEY) && mkdir -p $(JOURNEY)
	HF_HUB_OFFLINE=1 $(VENV)/bin/erasekit tiny-model --output $(JOURNEY)/tiny-flux
	HF_HUB_OFFLINE=1 $(VENV)/bin/erasekit erase --model $(JOURNEY)/tiny-flux --config configs/tiny-flux-cpu.yaml --concept cat --anchor dog --output $(JOURNEY)/mask-cat
	HF_HUB_OFFLINE=1 $(VENV)/bin/erasekit generate --model $(JOURNEY)/tiny-flux --prompt "a photo of a cat" --seed 0 --seed 1 --steps 4 --resolution 32 --output $(JOURNEY)/images-original
	HF_HUB_OFFLINE=1 $(VENV)/bin/erasekit generate --model $(JOURNEY)/tiny-flux --masks $(JOURNEY)/mask-cat --prompt "a photo of a cat" --seed 0 --seed 1 --output $(JOURNEY)/images-erased
	HF_HUB_OFFLINE=1 $(VENV)/bin/erasekit fold --model $(JOURNEY)/tiny-flux --masks $(JOURNEY)/mask-cat --mode prune --output $(JOURNEY)/tiny-flux-pruned
	HF_HUB_OFFLINE=1 $(PY) -c "from diffusers import DiffusionPipeline; p = DiffusionPipeline.from_pretrained('$(JOURNEY)/tiny-flux-pruned', trust_remote_code=True); print('stock diffusers loaded', type(p.transformer).__name__, sum(x.numel() for x in p.transformer.parameters()), 'parameters')"

# The suite runs on TEST_WORKERS processes (pytest-xdist; default: one per CPU, at most 4), each with its
# share of the cores for torch (tests/conftest.py). Tests that share an expensive fixture stay on one
# worker (`xdist_group`). TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST_PARALLEL := $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup,)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_PARALLEL)

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_PARALLEL)

# Lint and format check (ruff, configured in pyproject.toml); `ruff format` and `ruff check --fix` mend.
lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/trajectory_gradient.py
