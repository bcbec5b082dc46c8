import importlib
import sys

import pytest
import torch

import rlfuse
from rlfuse import _backend
from rlfuse._backend import cpp_ext

CHUNKED_IMPLS = ["cpp"] if cpp_ext() is not None else []
# The driver's two pass orders, both forced on every machine: "rows" and "slabs" of SLAB_ROWS
# vocabulary rows (V = 123 and 507 end on a short slab, V = 31 fits in one larger than V).
SLAB_ROWS = 50
# (impl, pass order) pairs for `@pytest.mark.parametrize("impl,pass_order", IMPL_ORDERS,
# indirect=["pass_order"])`: the reference has no pass order.
IMPL_ORDERS = [("reference", None)] + [(i, o) for i in CHUNKED_IMPLS for o in ("rows", "slabs")]


@pytest.fixture
def pass_order(request):
    """The driver's pass order for one test: "rows", "slabs", a number of rows per slab, or None
    (as configured)."""
    order = getattr(request, "param", None)
    before = _backend.vocab_slab_mode()
    if order is not None:
        _backend.set_vocab_slab({"rows": "off", "slabs": SLAB_ROWS}.get(order, order))
    yield order
    _backend.set_vocab_slab(before)


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
