"""What the three kernels share: the layouts of the tables they read, and two ``@triton.jit``
helpers (dtype codes to typed pointers and back).

One step is at most ``2 * (number of gradient dtypes) + 1`` launches, 3 when all covered
gradients share a dtype, whatever the number of tensors: ``reduce`` (reduce.py), then
``finalize`` (finalize.py), then ``apply`` (apply.py).

All tables are int64; addresses are byte addresses cast to typed pointers. See
docs/kernels.md for the layouts.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "TENS_COLS", "GTAB_COLS", "GROUP_COLS", "TILE_COLS", "COEF_COLS", "COL_COLS", "INST_COLS",
    "DT_FP32", "DT_BF16", "DT_FP16", "to_dt", "as_ptr",
]

# ---- table layouts (columns of the int64 tables; keep in sync with gradsafe/backends/triton_layout.py)
# tensors (T, TENS_COLS): numel, damp address (0: none), reduce groups [start, end),
#                         apply groups [start, end), norm partial base (tile 0)
TENS_COLS = 8
# per-step gradient table (T, 2): address, aligned flag
GTAB_COLS = 2
# reduce row groups (G, 8): rows address (row 0, first column), row stride, rows, partial base
#                           (row 0, the tensor's first tile), partial row stride (tiles of the block), -, -, -
# apply row groups  (G, 8): rows address (first applied row), row stride, rows, weight base, -, -, -, -
GROUP_COLS = 8
# tiles (n, 2): tensor position, tile index within the tensor
TILE_COLS = 2
# coefficient table (C, 4): partial base, count, stride, owned-by-a-column flag
COEF_COLS = 4
# rule columns (Z, 8): partial base, count, stride, weight base, count, stride, -, -
COL_COLS = 8
# rule instances (I, 8): nA, nR, column offset, K^+ offset, P2 offset, H offset, ref_norms2 offset, -
INST_COLS = 8

# dtype codes of gradients (G_DT) and stored rows (U_DT)
DT_FP32, DT_BF16, DT_FP16 = 0, 1, 2


@triton.jit
def to_dt(x, DT: tl.constexpr):
    if DT == 0:
        y = x.to(tl.float32)
    elif DT == 1:
        y = x.to(tl.bfloat16)
    else:
        y = x.to(tl.float16)
    return y


@triton.jit
def as_ptr(addr, DT: tl.constexpr):
    if DT == 0:
        p = addr.to(tl.pointer_type(tl.float32))
    elif DT == 1:
        p = addr.to(tl.pointer_type(tl.bfloat16))
    else:
        p = addr.to(tl.pointer_type(tl.float16))
    return p
