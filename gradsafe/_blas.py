"""Small host linear algebra runs with one BLAS thread.

The rule's matrices are tiny (tens of rows); numpy's multi-threaded BLAS on them fights the
threads torch is using and can be 10-100x slower than one thread (a 64 x 64 ``eigh`` took
35 ms instead of 1 ms here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from threadpoolctl import ThreadpoolController

_controller: ThreadpoolController | None = None


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    global _controller
    if _controller is None:
        _controller = ThreadpoolController()
    with _controller.limit(limits=1, user_api="blas"):
        yield
