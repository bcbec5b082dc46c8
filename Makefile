# Two commands set everything up on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3

.PHONY: install demo test bench

# torch is pinned to the CPU build first, so nothing later pulls a multi-GB CUDA build; the
# extension is then built against that torch (no isolated build environment).
install:
	$(PY) -m pip install -q torch==2.13.0 ninja "setuptools>=64" wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"

demo: install
	$(PY) -m rlfuse.engine.cli demo

test: install
	$(PY) -m pytest tests -q

bench: install
	$(PY) -m rlfuse.engine.cli bench linear_logprobs --shape qwen-0.5b

# >= 10,000 property-based cases of every op against the fp64 reference; prints the worst errors.
fuzz: install
	RLFUSE_FUZZ=1 $(PY) -m pytest tests/test_fuzz.py -q
