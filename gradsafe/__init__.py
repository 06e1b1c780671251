"""gradsafe: protect what a model already knows while it trains on something new."""

from .activations import ActivationBases, collect_activation_bases
from .collect import collect_gradients
from .fisher import fisher_diagonal
from .losses import kl_to_reference
from .monitor import GradientMonitor, JsonlSink, LoggingSink, TensorBoardSink
from .objective import ProtectedObjective
from .optimizer import ProtectedOptimizer
from .options import ObjectiveConfig
from .serialization import StateDictError

__all__ = [
    "ProtectedOptimizer",
    "ProtectedObjective",
    "ObjectiveConfig",
    "StateDictError",
    "collect_gradients",
    "fisher_diagonal",
    "kl_to_reference",
    "collect_activation_bases",
    "ActivationBases",
    "GradientMonitor",
    "JsonlSink",
    "TensorBoardSink",
    "LoggingSink",
]
__version__ = "0.1.0"
