"""gradsafe: protect what a model already knows while it trains on something new."""

from .collect import collect_gradients
from .objective import ObjectiveConfig, ProtectedObjective
from .optimizer import ProtectedOptimizer

__all__ = ["ProtectedOptimizer", "ProtectedObjective", "ObjectiveConfig", "collect_gradients"]
__version__ = "0.1.0"
