"""The runtime core: one run lifecycle, the graph executor (layered and staircase), feeds, prompts, budgets."""
