"""Fixtures shared by the study's tests."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """One torch thread, as the study's workers run (two cores shared: more threads only oversubscribe)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
