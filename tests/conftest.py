import sys

import pytest
import torch

import rlfuse
from rlfuse._backend import cpp_ext

CHUNKED_IMPLS = ["cpp"] if cpp_ext() is not None else []


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter):
    """After a run that included tests/test_fuzz.py: the worst error seen per op and quantity."""
    fuzz = sys.modules.get("tests.test_fuzz")  # the name under --import-mode=importlib
    if fuzz is not None and fuzz.WORST:
        terminalreporter.write_sep("-", "fuzz: worst error per op (share of the allowed error)")
        terminalreporter.write_line(fuzz.report())
