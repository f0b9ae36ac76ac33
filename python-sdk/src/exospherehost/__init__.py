"""Python SDK for Exosphere workers, compatible with the published ``exospherehost`` 0.0.3.

* :class:`Runtime` claims and executes the states of one namespace.
* :class:`BaseNode` is the base class of a node (nested ``Inputs``/``Outputs``/``Secrets``).
* :class:`StateManager` manages graph templates and starts runs.
* :class:`PruneSignal` / :class:`ReQueueAfterSignal` are raised from ``execute`` to end a
  branch or to run the state again later.
* The ``*Model`` classes, the enums and :class:`CronTrigger` describe graph templates.

More lives in submodules: :mod:`exospherehost.errors`, :mod:`exospherehost.testing`
(run a node without a server) and the run-view models in :mod:`exospherehost.models`.
"""

from ._version import VERSION
from .models import (
    CronTrigger,
    GraphNodeModel,
    RetryPolicyModel,
    RetryStrategyEnum,
    StoreConfigModel,
    UnitesModel,
    UnitesStrategyEnum,
)
from .node import BaseNode
from .runtime import Runtime
from .signals import PruneSignal, ReQueueAfterSignal
from .statemanager import StateManager

__version__ = VERSION

# The exported names of the published SDK; a test pins this list.
__all__ = [
    "VERSION",
    "BaseNode",
    "CronTrigger",
    "GraphNodeModel",
    "PruneSignal",
    "ReQueueAfterSignal",
    "RetryPolicyModel",
    "RetryStrategyEnum",
    "Runtime",
    "StateManager",
    "StoreConfigModel",
    "UnitesModel",
    "UnitesStrategyEnum",
]
