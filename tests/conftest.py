import pytest
import torch

import rlfuse
from rlfuse._backend import cpp_ext

CHUNKED_IMPLS = ["cpp"] if cpp_ext() is not None else []


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
