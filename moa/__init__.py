"""moa: Mixture-of-Agents inference with staircase streaming, routing and embedded engines.

Heavy parts load on first use, so `import moa` stays fast and pulls in no optional extra.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

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
    "RoutedMixture": "moa.routing",
    "RoutingConfig": "moa.routing",
    "RoutedResult": "moa.routing",
    "load_routing": "moa.routing",
    "Budget": "moa.budget",
    "SessionBudget": "moa.budget",
    "VerifierConfig": "moa.verifier",
    "wrap": "moa.openai_compat",
    "OpenAI": "moa.openai_compat",
    "AsyncOpenAI": "moa.openai_compat",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moa' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
