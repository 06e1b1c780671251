"""Small host linear algebra runs with one BLAS thread.

The rule's matrices are tiny (tens of rows); numpy's multi-threaded BLAS on them fights the
threads torch is using and can be 10-100x slower than one thread (a 64 x 64 ``eigh`` took
35 ms instead of 1 ms here).

threadpoolctl (in the ``[demo]`` extra, and a dependency of scikit-learn) is optional: without
it ``single_threaded_blas()`` changes nothing and BLAS keeps its threads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # optional: BLAS keeps its threads
    ThreadpoolController = None

_controller: Any = None


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the body with one BLAS thread (a no-op when threadpoolctl is not installed)."""
    global _controller
    if ThreadpoolController is None:
        yield
        return
    if _controller is None:
        _controller = ThreadpoolController()
    with _controller.limit(limits=1, user_api="blas"):
        yield
