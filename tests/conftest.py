import importlib
import sys

import pytest
import torch

import rlfuse
from rlfuse._backend import cpp_ext

CHUNKED_IMPLS = ["cpp"] if cpp_ext() is not None else []


def importable(fn):
    """`fn` as a spawned child can unpickle it: under --import-mode=importlib a test module is
    named `tests.<module>`, but only tests/ is on sys.path (not the repository root, so that
    kernels/ and engine/ are not importable as bare packages): look it up by its top-level name."""
    return getattr(importlib.import_module(fn.__module__.rpartition(".")[2]), fn.__name__)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter):
    """After a run that included tests/test_fuzz.py: the worst error seen per op and quantity."""
    fuzz = sys.modules.get("tests.test_fuzz")  # the name under --import-mode=importlib
    if fuzz is not None and fuzz.WORST:
        terminalreporter.write_sep("-", "fuzz: worst error per op (share of the allowed error)")
        terminalreporter.write_line(fuzz.report())
