"""An objective's memory: a record of tensors (``record``) and pure functions that return a
new record: merging samples (``merge``), fitting a budget (``budget``), sharding under
FSDP2 (``shard``), and (de)serialising (``state``)."""

from .budget import MemoryReport, MemoryRow, apply_budget, budget_bytes, memory_rows
from .merge import check_packed, from_bases, merge
from .record import EMPTY, Columns, Memory, ObjectiveLayout, pack_rows
from .shard import shard, unshard
from .state import memory_from_state, memory_state

__all__ = [
    "Memory",
    "EMPTY",
    "ObjectiveLayout",
    "Columns",
    "pack_rows",
    "merge",
    "from_bases",
    "check_packed",
    "apply_budget",
    "budget_bytes",
    "memory_rows",
    "MemoryReport",
    "MemoryRow",
    "shard",
    "unshard",
    "memory_state",
    "memory_from_state",
]
