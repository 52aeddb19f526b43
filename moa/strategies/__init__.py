"""The strategies, side by side, each a `moa.runtime.run.Run` subclass on the one run core.

- `graph`: the layered / staircase Mixture-of-Agents graph (`Execution`);
- `evolve`: Squeeze Evolve (`Evolution`);
- `debate`: multi-agent debate, layered or staircase, stopped at consensus (`Debate`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moa.runtime.run import Run


def strategy(name: str) -> type[Run]:
    """The `Run` subclass of a config's `strategy` (imported when first used)."""
    if name == "evolve":
        from moa.strategies.evolve import Evolution

        return Evolution
    if name == "debate":
        from moa.strategies.debate import Debate

        return Debate
    from moa.strategies.graph import Execution

    return Execution
