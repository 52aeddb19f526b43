"""Typed errors a user can hit. Each message is one clear sentence and never holds a secret."""

from __future__ import annotations

from typing import Any


class MoaError(Exception):
    """Base class of every error moa raises on purpose."""


class ConfigError(MoaError, ValueError):
    """A mixture, preset, registry entry or config file is invalid."""


class UnknownProviderError(ConfigError):
    """A model reference names a provider prefix that is not registered."""

    def __init__(self, prefix: str, known: list[str]) -> None:
        self.prefix = prefix
        super().__init__(
            f"Unknown provider prefix {prefix!r}; known prefixes: {', '.join(sorted(known))} "
            "(add your own under [providers] in the config)."
        )


class MissingKeyError(MoaError):
    """A provider needs an API key and its environment variable is not set."""

    def __init__(self, prefix: str, variable: str) -> None:
        self.prefix = prefix
        self.variable = variable
        super().__init__(f"Provider {prefix!r} needs an API key: set the {variable} variable.")


class ProviderError(MoaError):
    """A provider call failed. `retryable` tells whether trying again may help."""

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        model: str = "",
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        self.provider = provider
        self.model = model
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        super().__init__(message)


class ProviderTimeout(ProviderError):
    """A connect, read (stalled stream) or whole-call deadline passed."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("retryable", True)
        super().__init__(message, **kwargs)


class StreamInterrupted(ProviderError):
    """A stream failed after it had delivered text; `received` holds what arrived."""

    def __init__(self, message: str, *, received: str, **kwargs: Any) -> None:
        self.received = received
        super().__init__(message, **kwargs)


class StreamTimeout(StreamInterrupted, ProviderTimeout):
    """A stream went silent (read timeout) or hit its deadline after it had delivered text."""


class UnsupportedRequest(ConfigError):
    """A request asks for what this mixture cannot do (e.g. tools on a model without them)."""


class BudgetExceeded(MoaError):
    """A call would certainly exceed a hard budget, so it was not started."""


class MixtureError(MoaError):
    """A mixture run failed as a whole; `partial` keeps whatever result was assembled."""

    def __init__(self, message: str, partial: Any = None) -> None:
        self.partial = partial
        super().__init__(message)


class AggregatorFailed(MixtureError):
    """The final aggregator failed; the proposers' answers stay in `partial`."""


class AggregatorOverBudget(BudgetExceeded, AggregatorFailed):
    """The final aggregator's call was refused by a hard budget; `partial` keeps the proposals."""


class DeadlineExceeded(MixtureError):
    """The whole mixture did not finish within its `deadline_s`."""


class StructuredOutputError(MixtureError):
    """The final answer is not valid JSON, or does not match the requested schema."""


class NotEnoughProposers(MixtureError):
    """Fewer agents of a layer answered than `min_proposers` requires."""


class QuotaExceeded(BudgetExceeded, MixtureError):
    """A client key's budget (`moa serve --keys`) has no room for a call; the run stops."""


class StateUnavailable(MixtureError):
    """The shared state store (Redis) cannot be reached, so a shared budget refuses calls."""
