"""The strategies, side by side, each a `moa.runtime.run.Run` subclass on the one run core.

- `graph`: the layered / staircase Mixture-of-Agents graph (`Execution`);
- `evolve`: Squeeze Evolve (`Evolution`).
"""
