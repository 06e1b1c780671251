"""Fixtures shared by the backend tests."""

from __future__ import annotations

import pytest

from gradsafe.backends import torch_backend


@pytest.fixture
def small_parts(monkeypatch):
    """Let the torch backend's step split tensors of a few hundred entries."""
    monkeypatch.setattr(torch_backend, "MIN_CHUNK_COLUMNS", 32)
    monkeypatch.setattr(torch_backend, "CUT_ALIGN", 8)
