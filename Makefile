# Two commands set everything up on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3

# The installed entry points (not `python -m`, which puts the repository root on sys.path, where
# kernels/ would also be importable as a bare `kernels`).
BIN = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_path("scripts"))')

.PHONY: install demo test bench

# torch is pinned to the CPU build first, so nothing later pulls a multi-GB CUDA build; the
# extension is then built against that torch (no isolated build environment).
install:
	$(PY) -m pip install -q torch==2.13.0 ninja "setuptools>=64" wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"

demo: install
	$(BIN)/rlfuse demo

test: install
	$(BIN)/pytest tests -q

bench: install
	$(BIN)/rlfuse bench linear_logprobs --shape qwen-0.5b
