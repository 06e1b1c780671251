"""gradsafe in other training loops: Hugging Face Trainer, accelerate, Lightning, DCP, compile.

This package imports nothing heavy. The library-specific parts live in submodules that import
their library when they are imported:

- ``gradsafe.integrations.hf``: ``GradsafeCallback`` (Trainer logs), ``protected_optimizer_cls_and_kwargs``.
- ``gradsafe.integrations.lightning``: ``GradsafeLightningCallback``.
- ``gradsafe.integrations.checkpoint``: ``GradsafeMemory`` (the objectives' memory as a
  ``torch.distributed.checkpoint`` Stateful).

The helpers below need only torch.
"""

from ._common import (
    ProtectedOptimizerFromParams,
    ReportAccumulator,
    align_samples,
    find_protected_optimizer,
    flatten_report,
)

__all__ = [
    "ProtectedOptimizerFromParams",
    "ReportAccumulator",
    "align_samples",
    "find_protected_optimizer",
    "flatten_report",
]
