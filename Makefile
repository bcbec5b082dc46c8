# Two commands set everything up on a fresh machine:  `make demo`  and  `make test`.
#
# Environment: the one already active (VIRTUAL_ENV or CONDA_PREFIX), else a `.venv` in this
# folder that make creates with $(PYTHON). Debian's python refuses system-wide pip installs
# (PEP 668), and a shared interpreter would re-point another checkout's editable install.
# The install runs again only when the packaging files or the C++ sources change (a stamp in
# the environment, one per checkout).
PYTHON ?= python3
ENV := $(or $(VIRTUAL_ENV),$(CONDA_PREFIX),$(CURDIR)/.venv)
PY := $(ENV)/bin/python
STAMP := $(ENV)/.rlfuse-installed$(subst /,-,$(CURDIR))

# The installed entry points (not `python -m`, which puts the repository root on sys.path, where
# kernels/ would also be importable as a bare `kernels`).
BIN := $(ENV)/bin

.PHONY: install demo test bench fuzz

$(PY):
	$(PYTHON) -m venv $(ENV) || { echo "rlfuse: '$(PYTHON) -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2; exit 1; }

# torch is pinned to the CPU build first, so nothing later pulls a multi-GB CUDA build; the
# extension is then built against that torch (no isolated build environment).
$(STAMP): setup.py pyproject.toml $(wildcard csrc/*/*.cpp csrc/*/*.h bindings/*.cpp) | $(PY)
	$(PY) -m pip install -q torch==2.13.0 ninja "setuptools>=64" wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/rlfuse demo

test: install
	$(BIN)/pytest tests -q

bench: install
	$(BIN)/rlfuse bench linear_logprobs --shape qwen-0.5b

# >= 10,000 property-based cases of every op against the fp64 reference; prints the worst errors.
fuzz: install
	RLFUSE_FUZZ=1 $(BIN)/pytest tests/test_fuzz.py -q
