"""moa: Mixture-of-Agents inference with staircase streaming, routing and embedded engines.

Heavy parts load on first use, so `import moa` stays fast and pulls in no optional extra; type
checkers see every public name through the `TYPE_CHECKING` imports below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EVENTS = [
    "AgentId",
    "Event",
    "RunStarted",
    "Notice",
    "AgentStarted",
    "AgentCall",
    "AgentWaiting",
    "AgentRetrying",
    "AgentDelta",
    "AgentFinished",
    "AgentFailed",
    "UsageReport",
    "FinalDelta",
    "RouteDecision",
    "StaircaseStep",
    "RunFinished",
    "RunFailed",
]
_ERRORS = [
    "MoaError",
    "ConfigError",
    "UnknownProviderError",
    "MissingKeyError",
    "ProviderError",
    "ProviderTimeout",
    "StreamInterrupted",
    "StreamTimeout",
    "BudgetExceeded",
    "MixtureError",
    "AggregatorFailed",
    "AggregatorOverBudget",
    "DeadlineExceeded",
    "NotEnoughProposers",
]

_LAZY: dict[str, str] = {
    "Mixture": "moa.mixture",
    "AgentConfig": "moa.config",
    "LayerConfig": "moa.config",
    "MixtureConfig": "moa.config",
    "StaircaseConfig": "moa.config",
    "preset": "moa.config",
    "load": "moa.config",
    "MixtureResult": "moa.result",
    "AgentOutput": "moa.result",
    "Registry": "moa.providers.registry",
    "ProviderSpec": "moa.providers.registry",
    "EvolveConfig": "moa.config",
    "Budget": "moa.runtime.budget",
    "SessionBudget": "moa.runtime.budget",
    "VerifierConfig": "moa.routing.verifier",
    "wrap": "moa.openai.client",
    "OpenAI": "moa.openai.client",
    "AsyncOpenAI": "moa.openai.client",
    **dict.fromkeys(_EVENTS, "moa.events"),
    **dict.fromkeys(_ERRORS, "moa.errors"),
}

__all__ = [*_LAZY, "__version__"]

if TYPE_CHECKING:
    from moa.config import (
        AgentConfig,
        EvolveConfig,
        LayerConfig,
        MixtureConfig,
        StaircaseConfig,
        load,
        preset,
    )
    from moa.errors import (
        AggregatorFailed,
        AggregatorOverBudget,
        BudgetExceeded,
        ConfigError,
        DeadlineExceeded,
        MissingKeyError,
        MixtureError,
        MoaError,
        NotEnoughProposers,
        ProviderError,
        ProviderTimeout,
        StreamInterrupted,
        StreamTimeout,
        UnknownProviderError,
    )
    from moa.events import (
        AgentCall,
        AgentDelta,
        AgentFailed,
        AgentFinished,
        AgentId,
        AgentRetrying,
        AgentStarted,
        AgentWaiting,
        Event,
        FinalDelta,
        Notice,
        RouteDecision,
        RunFailed,
        RunFinished,
        RunStarted,
        StaircaseStep,
        UsageReport,
    )
    from moa.mixture import Mixture
    from moa.openai.client import AsyncOpenAI, OpenAI, wrap
    from moa.providers.registry import ProviderSpec, Registry
    from moa.result import AgentOutput, MixtureResult
    from moa.routing.verifier import VerifierConfig
    from moa.runtime.budget import Budget, SessionBudget


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moa' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
